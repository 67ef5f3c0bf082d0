# Source on the GPU machine: install carried wheels, make the adapters importable, keep NVLS off.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
ln -sfn "$PWD/adapters/megatron" /tmp/site/sp_core_megatron
ln -sfn "$PWD/adapters/sglang" /tmp/site/sp_core_sglang
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
