#!/bin/bash
# Submit the conversion array and its merge: SRC=... OUT=... slurm/submit_convert.sh [NUM_TASKS]
set -euo pipefail
: "${SRC:?set SRC}" "${OUT:?set OUT}"
here=$(cd "$(dirname "$0")" && pwd)
n=${1:-64}
jid=$(sbatch --parsable --export=ALL --array=0-$((n - 1)) "$here/convert_imagenet.sbatch")
mid=$(sbatch --parsable --export=ALL --dependency=afterok:"${jid%%;*}" "$here/merge_shards.sbatch")
echo "conversion array ${jid} (${n} tasks), merge ${mid}"
