#!/usr/bin/env bash
# tests/mutations.sh: plant each plausible bug below in a clean worktree of HEAD (one text
# replacement), run the test that should catch it, and print CAUGHT (the test fails) or
# MISSED. The table in docs/testing.md comes from it:
#     NORMLAB_DATA=../shared/data/mnist bash tests/mutations.sh
set -u
REPO=${REPO:-$(git rev-parse --show-toplevel)}
PY=${PY:-$REPO/.venv/bin/python}
MUT=$(mktemp -d)/mut
run() {  # name, file, python-replace-old, new, test selector
  local name=$1 file=$2 old=$3 new=$4 sel=$5
  rm -rf $MUT && git -C $REPO worktree add -q --detach $MUT HEAD 2>/dev/null
  python3 - "$file" "$old" "$new" "$MUT" <<'PY'
import sys
from pathlib import Path
p = Path(sys.argv[4]) / sys.argv[1]; t = p.read_text()
assert sys.argv[2] in t, "pattern not found: " + sys.argv[2]
p.write_text(t.replace(sys.argv[2], sys.argv[3], 1))
PY
  if [ $? -ne 0 ]; then echo "PATTERN MISSING  $name"; git -C $REPO worktree remove --force $MUT; return; fi
  (cd $MUT && PYTHONPATH=$MUT/src timeout 900 \
     "$PY" -m pytest -q -x -p no:cacheprovider $sel > $MUT.log 2>&1)
  if [ $? -eq 0 ]; then echo "MISSED  $name"; else echo "CAUGHT  $name ($(grep -E '^FAILED' $MUT.log | head -1 | cut -c1-110))"; fi
  git -C $REPO worktree remove --force $MUT
}
run "loss weight of an uneven rank batch inverted" src/normlab/engine.py \
  "loss = loss * (world * len(y) / loader.batch_length(batch - 1))" \
  "loss = loss * (loader.batch_length(batch - 1) / (world * len(y)))" \
  "tests/test_distributed.py::test_two_ranks_equal_one_process_in_float64"
run "sharded evaluation: every rank evaluates every batch" src/normlab/engine.py \
  "        if i % world != rank:
            continue" "        if False:
            continue" \
  "tests/test_distributed.py::test_two_ranks_equal_one_process_in_float64"
run "virtual batches: no gradient reaches the bias" src/normlab/batchnorm.py \
  "self._repeat(self.bias, k), k)" "self._repeat(None if self.bias is None else self.bias.detach(), k), k)" \
  "tests/test_distributed.py -k virtual_batches_equal"
run "resume: the loader's random state not restored" src/normlab/checkpoint.py \
  "        generator.set_state(state[\"rng\"][\"loader\"])" "        pass" \
  "tests/test_engine.py -k resume_inside_one_process"
run "resume: Batch Norm's running statistics not saved" src/normlab/checkpoint.py \
  "\"model\": model.state_dict(), \"optimizer\"" "\"model\": {k: v for k, v in model.state_dict().items() if 'running' not in k}, \"optimizer\"" \
  "tests/test_engine.py -k resume_inside_one_process"
run "sync BN: bfloat16 statistics (no float32 promotion)" src/normlab/batchnorm.py \
  "full = x.to(torch.promote_types(x.dtype, torch.float32))" "full = x" \
  "tests/test_distributed.py::test_sync_batchnorm_over_two_ranks_equals_batchnorm_over_the_whole_batch tests/test_layers.py -k bfloat16"
run "Batch Renorm: r and d carry gradient" src/normlab/batchnorm.py \
  "    @torch.no_grad()
    def _renorm(" "    def _renorm(" \
  "tests/test_layers.py -k batch_renorm"
run "Batch Renorm: eps added to the std" src/normlab/batchnorm.py \
  "r = ((var + self.eps).sqrt() / running_std)" "r = ((var.sqrt() + self.eps) / running_std)" \
  "tests/test_layers.py -k batch_renorm"
run "FRN: one threshold for all channels" src/normlab/normact.py \
  "                             _per_channel(self.tau, x))" "                             self.tau.mean().to(x.dtype))" \
  "tests/test_layers.py -k filter_response"
run "PreciseBN: last batch's statistics instead of the average" src/normlab/precise.py \
  "        m.running_var.copy_(var / total)" "        pass" \
  "tests/test_norms.py -k precise_bn"
run "EvoNorm-B0: batch variance at eval instead of the running one" src/normlab/normact.py \
  "batch = self._batch_var(mean, var, x) if self.training \\" "batch = self._batch_var(mean, var, x) if True \\" \
  "tests/test_layers.py -k evonorm_b0"
run "Weight Standardization: eps outside the square root (no eps)" src/normlab/normact.py \
  "training=True, momentum=0.0, eps=self.eps)" "training=True, momentum=0.0, eps=0.0)" \
  "tests/test_layers.py -k std_conv"
run "precise-grouped: statistics over the whole batch" src/normlab/evaluate.py \
  "grouped = trained.images_per_statistic if mode == \"precise-grouped\" else None" "grouped = None" \
  "tests/test_evaluate.py -k oracles"
