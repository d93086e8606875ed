#!/bin/bash
# Submit plan → conversion array → merge: SRC=... OUT=... [SPLIT=... SHARD_SIZE=... SEED=...] slurm/submit_convert.sh [NUM_TASKS]
set -euo pipefail
: "${SRC:?set SRC}" "${OUT:?set OUT}"
here=$(cd "$(dirname "$0")" && pwd)
n=${1:-64}
pid=$(sbatch --parsable --export=ALL "$here/plan_imagenet.sbatch")
jid=$(sbatch --parsable --export=ALL --dependency=afterok:"${pid%%;*}" --array=0-$((n - 1)) \
  "$here/convert_imagenet.sbatch")
mid=$(sbatch --parsable --export=ALL --dependency=afterok:"${jid%%;*}" "$here/merge_shards.sbatch")
echo "plan ${pid}, conversion array ${jid} (${n} tasks), merge ${mid}"
