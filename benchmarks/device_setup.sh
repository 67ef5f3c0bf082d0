# Source on the GPU machine from the repository root: install the carried wheels (.whl/) and this
# package's metadata (its entry points: `sp-core`, the engines megatron / sglang, sglang's plugin),
# keep the code itself running from this tree, and keep NVLink multicast off.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
  --target /tmp/site . || return 1
rm -rf /tmp/site/sp_core /tmp/site/sp_core_megatron /tmp/site/sp_core_sglang  # the copies: use this tree
ln -sfn "$PWD/adapters/megatron" /tmp/site/sp_core_megatron
ln -sfn "$PWD/adapters/sglang" /tmp/site/sp_core_sglang
export PYTHONPATH="$PWD:/tmp/site" PATH="/tmp/site/bin:$PATH" PYTHONUNBUFFERED=1 \
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
