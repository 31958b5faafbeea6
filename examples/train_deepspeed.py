"""Train a tiny HF Llama with AutoSP turned on from a DeepSpeed config (DP x SP, ZeRO 0/1/2).

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 4 examples/train_deepspeed.py --sp 2 --zero 1

Ranks 0..P-1 form the first sequence-parallel group, P..2P-1 the next, and so on; each SP group is
one data-parallel replica and all its ranks feed that replica's full batch. DeepSpeed reduces the
gradients over DP x SP (summed over SP, averaged over DP). The printed loss is the mean over the
replicas of each replica's loss: with the same global batch it is what one device computes.
"""
import argparse

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

import autosp.deepspeed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sp", type=int, default=2)
    parser.add_argument("--zero", type=int, default=1, choices=(0, 1, 2))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=30)  # need not divide by P
    args = parser.parse_args()
    dist.init_process_group("gloo")  # torchrun's env; autosp.deepspeed never JIT-builds DeepSpeed ops

    config = {
        "train_micro_batch_size_per_gpu": 2,
        "compile": {"deepcompile": True, "passes": ["autosp"]},
        "sequence_parallel_size": args.sp,
        "zero_optimization": {"stage": args.zero},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
    }
    torch.manual_seed(0)  # same weights on every rank (DeepSpeed broadcasts rank 0's anyway)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
        intermediate_size=128, attn_implementation="sdpa", use_cache=False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = autosp.deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                             backend="aot_eager")
    g = engine.autosp_groups

    for i in range(args.steps):
        ids = torch.randint(0, 128, (2, args.seq_len), generator=torch.Generator().manual_seed(100 * i + g.dp_rank))
        loss = engine(input_ids=ids, labels=ids).loss  # this replica's whole-sequence loss
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=g.dp_group)
        if dist.get_rank() == 0:
            print(f"step {i}: loss {mean.item() / g.dp_size:.4f} (DP={g.dp_size} x SP={g.sp_size}, ZeRO {args.zero})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
