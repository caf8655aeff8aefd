"""The Synthesis widget's engine is kept between runs (loaded networks, per-CT cache) until the weights change."""

from difftumor_napari import synthesis as st


def test_shared_engine_is_reused_until_the_folder_changes(tmp_path):
    a = st.shared_engine(str(tmp_path), "cpu")
    assert st.shared_engine(str(tmp_path), "cpu") is a
    (tmp_path / "liver_early.pt").write_bytes(b"new file")
    b = st.shared_engine(str(tmp_path), "cpu")
    assert b is not a and st.shared_engine(str(tmp_path), "cpu") is b
    assert st.shared_engine(None, "cpu") is not b


def test_no_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("DIFFTUMOR_WEIGHTS", raising=False)
    a = st.shared_engine(None, "cpu")
    assert a.weights.root is None
    (tmp_path / "w").mkdir()
    monkeypatch.setenv("DIFFTUMOR_WEIGHTS", str(tmp_path / "w"))
    b = st.shared_engine(None, "cpu")
    assert b is not a and b.weights.root is not None
