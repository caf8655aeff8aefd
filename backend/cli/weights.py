"""`difftumor weights {check,fetch}`: inspect and download the weights folder (see backend/weights.py)."""

from __future__ import annotations

import json
import logging

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("weights", help="check or download the diffusion/autoencoder weights")
    verbs = p.add_subparsers(dest="weights_command", metavar="{check,fetch}", required=True)

    c = verbs.add_parser("check", help="list present/missing weights per organ, verify they load, that each "
                        "diffusion file's stage fits its name and its autoencoder is the folder's (docs/weights.md), "
                        "print sha256")
    c.add_argument("dir", nargs="?", default=None, help="weights folder (default: $DIFFTUMOR_WEIGHTS or the user config)")
    c.add_argument("--no-load", action="store_true", help="only list files and checksums (fast)")
    c.add_argument("--remember", action="store_true",
                   help="store DIR as the default weights folder in the user config (also an empty one, with a "
                   "warning: 'difftumor weights fetch' then downloads into it)")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(func=check_handler)

    f = verbs.add_parser("fetch", help="download the released weights (resumable; checked against the manifest's "
                         "sha256 where it lists one; run 'weights check' afterwards to load-test them)")
    f.add_argument("--dest", default=None, help="destination folder (default: the resolved weights folder)")
    f.add_argument("--organ", action="append", choices=["liver", "pancreas", "kidney"],
                   help="organ(s) to fetch (repeatable; default all three); the autoencoder is always fetched")
    f.add_argument("--base-url", default=None, help="mirror to download from instead of the manifest's address")
    f.add_argument("--force", action="store_true", help="download again even when a file is present")
    f.set_defaults(func=fetch_handler)


def check_handler(args) -> int:
    from backend import weights
    from backend.errors import DiffTumorError

    root, source = weights.resolve_weights_dir(args.dir, what="weights folder")
    if root is None:
        raise DiffTumorError(f"weights check: no folder given; pass DIR, set ${weights.ENV_VAR}, "
                             "or run 'difftumor weights fetch --dest DIR'")
    rows = weights.check_folder(root, load=not args.no_load)
    empty = not any(r["present"] for r in rows)
    bad = [r for r in rows if r["present"] and (r["loads"] is False or r["sha_ok"] is False or r.get("compatible") is False)]
    if args.remember:
        weights.set_weights_dir(root)
        if empty:
            log.warning("remembered %s as the weights folder although it holds no weights yet "
                        "('difftumor weights fetch' downloads into it)", root)
        elif bad:
            log.warning("remembered %s as the weights folder although %s %s (see below)", root,
                        ", ".join(r["name"] for r in bad), "is broken or does not fit" if len(bad) == 1 else "are broken or do not fit")
    if args.json:
        print(json.dumps({"folder": str(root), "source": source, "files": rows}, indent=1))
    else:
        print(f"weights folder: {root} ({source})")
        for r in rows:
            if not r["present"]:
                print(f"  MISSING  {r['name']}")
                continue
            state = "INCOMPATIBLE" if r.get("compatible") is False else {True: "loads", False: "BROKEN", None: "not loaded"}[r["loads"]]
            sha = {True: " (matches manifest)", False: " (DIFFERS from manifest)", None: ""}[r["sha_ok"]]
            print(f"  {state:12s} {r['name']:24s} {r['size'] / 1e6:8.1f} MB  sha256 {r['sha256']}{sha}")
            if r["error"]:
                print(f"               {r['error']}")
            if r.get("warning"):
                print(f"               warning: {r['warning']}")
        by_name = {r["name"]: r for r in rows}
        for organ in weights.WEIGHT_ORGANS:
            ready = [st for st, names in (("early", (weights.AE_NAME, f"{organ}_early.pt")),
                                          ("mid/late", (weights.AE_NAME, f"{organ}_noearly.pt")))
                     if all(by_name[n]["present"] and by_name[n]["loads"] is not False
                            and by_name[n].get("compatible") is not False for n in names)]
            print(f"  {organ:9s} diffusion ready for: {', '.join(ready) if ready else 'nothing (model-based only)'}")
    if empty:
        others = weights.other_weight_files(root)
        hint = (f"; it holds {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}, which must carry the "
                "expected names" if others else f"; download them with 'difftumor weights fetch --dest {root}'")
        log.error("weights folder %s holds none of the expected files (%s)%s", root, weights.EXPECTED_NAMES, hint)
        return 1
    return 1 if bad else 0


def fetch_handler(args) -> int:
    from backend import weights

    organs = tuple(args.organ) if args.organ else weights.WEIGHT_ORGANS
    got = weights.fetch(args.dest, organs=organs, base_url=args.base_url, force=args.force)
    folder = got[0].parent if got else args.dest
    log.info("%d file(s) in %s; check that they load with 'difftumor weights check %s'", len(got), folder, folder)
    return 0
