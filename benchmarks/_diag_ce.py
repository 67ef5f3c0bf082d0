import faulthandler, os, sys, time
import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks.bench import random_qwen3_stack


def rank(pregrow, train_too):
    from sp_core import mpu
    from sp_core.layers import PackedBatch
    from sp_core.mpu import copy_engine, platform
    faulthandler.dump_traceback_later(45, exit=True)
    os.environ["SP_CORE_ASYNC_TP"] = "copy_engine"
    os.environ["SP_CORE_FUSED"] = "1"
    t, r = mpu.tp_size(), mpu.tp_rank()
    cfg, stack = random_qwen3_stack(4)
    dev = platform.current_device()
    if pregrow:
        copy_engine._workspace(mpu.tp_group().group_name, 32768 * 4096 * 2)
    def log(m):
        print(f"[r{r} {time.strftime('%H:%M:%S')}] {m}", flush=True)
    for tokens in (8192, 2048, 32768):
        if tokens == 2048 and os.environ.get('PRE32'):
            copy_engine._workspace(mpu.tp_group().group_name, 32768 * 4096 * 2)
        for train in ((False, True) if train_too else (False,)):
            x = torch.randn(tokens // t, cfg.hidden_size, device=dev, dtype=torch.bfloat16, requires_grad=train)
            pos = torch.arange(tokens, device=dev)
            batch = PackedBatch([tokens])
            with torch.set_grad_enabled(train):
                for i in range(3):
                    h = x
                    for li, layer in enumerate(stack):
                        h = layer(h, pos, batch)
                        torch.cuda.synchronize()
                        if i == 0:
                            log(f"T={tokens} train={train} layer {li} ok")
                    if train:
                        h.backward(torch.randn_like(h))
                        torch.cuda.synchronize()
                        log(f"T={tokens} backward ok")
            log(f"T={tokens} train={train} 3 calls ok")
    faulthandler.cancel_dump_traceback_later()
    return True


if __name__ == "__main__":
    from sp_core.mpu.launch import run_ranks
    print(run_ranks(2, rank, sys.argv[1] == "1", sys.argv[2] == "1", timeout=120))
