#!/usr/bin/env bash
# Trains the tiny VQGAN for a few hundred steps on the shared CT (CPU, 2 threads) and prints the
# reconstruction L1 from metrics.csv, to show that it falls. Usage: bash bench/train_autoencoder_tiny.sh [OUT]
set -euo pipefail
OUT=${1:-$(mktemp -d /tmp/difftumor_ae_tiny.XXXXXX)/run}  # a fresh folder: a run over an earlier one is refused
CT=${DIFFTUMOR_SHARED:-$(dirname "$0")/../../shared}/data/totalseg_abdomen_3mm/example_ct_sm.nii.gz
difftumor train autoencoder --config "$(dirname "$0")/../backend/configs/autoencoder_tiny.yaml" \
  data.source="$CT" output_dir="$OUT" model.n_hiddens=4 model.num_groups=4 max_steps=${STEPS:-300} val_every=100 "${@:2}"
python - "$OUT/metrics.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
for r in rows[:: max(1, len(rows) // 10)] + rows[-1:]:
    print(f"step {int(r['step']):5d}  recon_l1 {float(r['recon_l1']):.4f}  perplexity {float(r['perplexity']):.1f}")
PY
