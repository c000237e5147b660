#!/bin/bash
# Train on several machines under SLURM: one torchrun agent per machine, all meeting at the first machine.
#
#   DATA=corpus.txt SPM=bpe.model MDIR=/shared/runs/big sbatch --nodes 2 scripts/slurm_train.sh --preset large [--fsdp]
#
# MDIR and CACHE must be on a file system every machine sees: rank 0 writes the checkpoints there and every rank reads
# them on resume (ranks that find different checkpoints stop the run with a one-line error). Resubmitting the same
# command resumes the run from its last checkpoint. Flags after the script go to train.py; the corpus's
# --encoding_errors goes in ENCODING_ERRORS (the token cache is built with it first). Two minutes before the time
# limit every process gets SIGTERM (--signal): the run saves at the end of its step and stops.
#SBATCH --job-name=score-lm
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --signal=TERM@120
set -euo pipefail
: "${DATA:?set DATA to the corpus}" "${SPM:?set SPM to its tokenizer}" "${MDIR:?set MDIR to the run folder}"
CACHE=${CACHE:-$(dirname "$MDIR")/token-cache}
ERRORS=${ENCODING_ERRORS:-strict}
GPUS=${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')  # awk reads on: no SIGPIPE under pipefail
PORT=${PORT:-29500}

# the token cache, built once before the ranks start (rank 0 would build it too, but the others wait for it at a
# barrier that NCCL gives up on after 10 minutes, less than a large corpus takes)
srun --nodes 1 --ntasks 1 --cpus-per-task "${SLURM_CPUS_PER_TASK:-1}" python bench.py data -d "$DATA" -spm "$SPM" \
    --cache_dir "$CACHE" --encoding_errors "$ERRORS" --batches 1 > /dev/null

srun --cpus-per-task "${SLURM_CPUS_PER_TASK:-1}" torchrun --nnodes "$SLURM_NNODES" --nproc-per-node "$GPUS" \
    --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$HEAD:$PORT" train.py -d "$DATA" -spm "$SPM" -mdir "$MDIR" --cache_dir "$CACHE" \
    --encoding_errors "$ERRORS" "$@"
