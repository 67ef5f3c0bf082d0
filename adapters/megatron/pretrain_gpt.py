"""Megatron-LM's training loop (``megatron.training.pretrain``) with ``--sp-core``: what Megatron-LM's own
``pretrain_gpt.py`` is, with sp-core's model provider and argument group. Start it with torchrun, one
process per GPU, and Megatron-LM's own flags:

    torchrun --nproc-per-node 2 -m sp_core_megatron.pretrain_gpt \\
        --sp-core --sp-core-hf-model DIR --tensor-model-parallel-size 2 --sequence-parallel \\
        --mock-data --tokenizer-type NullTokenizer --vocab-size V --num-layers L --hidden-size H ...

With ``--sp-core`` the model is the core's (Qwen2 / Qwen3 / DeepSeek V2 / V3 / V3.2), initialised from the
Hugging Face checkpoint DIR; Megatron's shape flags must describe that checkpoint (they feed Megatron's
logs and FLOPs counts) and are checked against it. Without ``--sp-core``: Megatron's own GPTModel (local
spec). Data: ``--mock-data`` (Megatron's MockGPTDataset) or ``--data-path`` (Megatron's GPTDataset).

Needs megatron-core >= 0.17 (its ``megatron.training``, Python >= 3.12) and CUDA devices; see docs/megatron.md.
"""
from __future__ import annotations

import sys
from functools import partial

import torch

from sp_core.models import ModelConfig, ModelError
from sp_core_megatron.config import extra_args_provider


def megatron_gpt_model(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None, **_):
    """Without --sp-core: Megatron's own GPTModel with its local (no Transformer Engine) layer spec."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.training import get_args
    from megatron.training.arguments import core_transformer_config_from_args

    args = get_args()
    config = config or core_transformer_config_from_args(args)
    spec = get_gpt_layer_local_spec(num_experts=args.num_experts, qk_layernorm=args.qk_layernorm,
                                    normalization=args.normalization)
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=args.padded_vocab_size,
                    max_sequence_length=args.max_position_embeddings, pre_process=pre_process,
                    post_process=post_process, parallel_output=True,
                    share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                    position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
                    pg_collection=pg_collection, vp_stage=vp_stage)


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Megatron's GPT datasets: MockGPTDataset with --mock-data, else GPTDataset over --data-path."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    from megatron.training import get_args, get_tokenizer
    from megatron.training.utils import get_blend_and_blend_per_split

    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend, blend_per_split=blend_per_split,
        split=args.split, path_to_cache=args.data_cache_path, tokenizer=get_tokenizer(),
        reset_position_ids=args.reset_position_ids, reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss, create_attention_mask=args.create_attention_mask_in_dataloader)
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(dataset_type, train_val_test_num_samples, lambda: True, config).build()


# every rank builds the (deterministic) datasets itself: no broadcast of batches over TP
train_valid_test_datasets_provider.is_distributed = True


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron's per-token convention: (loss sum, tokens, {"lm loss": [sum, tokens]})."""
    mask = loss_mask.reshape(-1).float()
    total = (output_tensor.reshape(-1).float() * mask).sum()
    tokens = mask.sum().to(torch.int)
    return total, tokens, {"lm loss": torch.cat([total.detach().view(1), tokens.float().view(1)])}


def forward_step(data_iterator, model):
    """Megatron's forward_step_func: (per-token loss [b, s], loss_func)."""
    from sp_core.mpu import platform

    device = platform.current_device()
    from megatron.core.utils import get_batch_on_this_cp_rank

    batch = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
             for k, v in next(data_iterator).items()}
    batch = get_batch_on_this_cp_rank(batch)  # Megatron's zig-zag split (the batch itself at cp 1)
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def check_args_against_checkpoint(args) -> None:
    """One line before anything starts: Megatron's shape flags describe the checkpoint, the tokenizer's ids
    fit its vocabulary, and the parallel settings are ones the core supports."""
    from megatron.training.arguments import core_transformer_config_from_args

    from sp_core_megatron.config import check_supported, check_supported_for_model, moe_parallel_mode
    from sp_core_megatron.provider import as_sp_core_config

    if not args.sp_core_hf_model:
        raise ModelError("--sp-core needs --sp-core-hf-model DIR (a Hugging Face checkpoint to start from)")
    config = as_sp_core_config(core_transformer_config_from_args(args), args.sp_core_hf_model)
    check_supported(config)
    hf = ModelConfig.from_pretrained(args.sp_core_hf_model, moe_parallel_mode(config))
    check_supported_for_model(config, hf)
    hf.check_tp(args.tensor_model_parallel_size)
    for flag, given, expected in (("--num-layers", args.num_layers, hf.num_hidden_layers),
                                  ("--hidden-size", args.hidden_size, hf.hidden_size),
                                  ("--num-attention-heads", args.num_attention_heads, hf.num_attention_heads)):
        if given != expected:
            raise ModelError(f"{flag} {given} does not match the checkpoint {args.sp_core_hf_model} ({expected}); "
                             f"Megatron's shape flags must describe the checkpoint")
    vocab = getattr(args, "vocab_size", None)
    if vocab is not None and vocab > hf.vocab_size:
        raise ModelError(f"--vocab-size {vocab} exceeds the checkpoint's vocabulary ({hf.vocab_size}): token ids "
                         f"past it have no embedding; use --vocab-size {hf.vocab_size}")
    if args.seq_length > hf.max_position_embeddings:
        raise ModelError(f"--seq-length {args.seq_length} is longer than the checkpoint's context "
                         f"({hf.max_position_embeddings}, max_position_embeddings)")


def use_the_wheels_dataset_helpers() -> None:
    """Start-up change: megatron.training compiles megatron/core/datasets/helpers.cpp with ``make`` in the
    installed package on rank 0 (Megatron-LM's repository has the Makefile). The megatron-core wheel ships
    the module compiled (``helpers_cpp``) and no Makefile, so ``make`` fails and rank 0 exits. When the
    compiled module imports, there is nothing to compile."""
    from megatron.core.datasets import utils

    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError:
        return  # a source checkout: let Megatron compile it
    utils.compile_helpers = lambda: None


def main() -> int:
    from megatron.core.enums import ModelType
    from megatron.training import get_args, pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    from sp_core_megatron.provider import make_model_provider

    use_the_wheels_dataset_helpers()
    parse_and_validate_args(extra_args_provider=extra_args_provider)
    args = get_args()
    if args.sp_core:
        try:
            check_args_against_checkpoint(args)
        except ModelError as err:
            print(f"sp_core_megatron.pretrain_gpt: error: {err}", file=sys.stderr, flush=True)
            return 2
    pretrain(pretrain_cfg_container_from_args(args), train_valid_test_datasets_provider, ModelType.encoder_or_decoder,
             forward_step, model_provider=make_model_provider(megatron_gpt_model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
