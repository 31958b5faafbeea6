"""Train a tiny HF Llama with Ulysses sequence parallelism on every rank of a torchrun job.

    torchrun --nproc_per_node 2 examples/train_hf_llama.py          # CPU, gloo
    torchrun --nproc_per_node 8 examples/train_hf_llama.py --cuda   # 8 GPUs, NCCL

Every rank feeds the same full batch; the compiled graph takes its own part of the sequence. The
loss is the whole sequence's on every rank; gradients are summed over the SP group (an all-reduce
here: with several SP groups, reduce over each group, then average over data parallelism).
"""
import argparse

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

import autosp


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=30)  # need not divide by the group size
    args = parser.parse_args()
    dist.init_process_group("nccl" if args.cuda else "gloo")
    device = torch.device("cuda", dist.get_rank() % torch.cuda.device_count()) if args.cuda else torch.device("cpu")
    if args.cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # same weights on every rank
    config = LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=2, intermediate_size=128, attn_implementation="sdpa",
                         use_cache=False)
    model = LlamaForCausalLM(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = autosp.compile(model, backend="inductor" if args.cuda else "aot_eager")

    for i in range(args.steps):
        ids = torch.randint(0, 128, (2, args.seq_len), generator=torch.Generator().manual_seed(i)).to(device)
        loss = step(input_ids=ids, labels=ids).loss
        loss.backward()
        for p in model.parameters():  # SP convention: sum the ranks' gradients
            dist.all_reduce(p.grad)
        optimizer.step()
        optimizer.zero_grad()
        if dist.get_rank() == 0:
            print(f"step {i}: loss {loss.item():.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
