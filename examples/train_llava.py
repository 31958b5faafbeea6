"""Train a tiny HF LLaVA with sequence parallelism on its vision tower and its language model.

    torchrun --nproc_per_node 2 examples/train_llava.py     # CPU, gloo

``auto_wrap_model_for_sp`` adds hooks to every vision and language layer (parameters and names do
not change). Every rank feeds the same full batch: pixels, token ids with the image tokens, labels.
The loss is the whole batch's on every rank; ``logits`` are this rank's chunk of the sequence;
gradients are summed over the SP group. The last step prints the loss of the same weights on one
device, for comparison (they agree to ~1e-7: HF computes the loss in float32, summed here in
another order).
"""
import os
import sys

import torch
import torch.distributed as dist

from autosp.multimodal import auto_wrap_model_for_sp, detect_model_sp_info

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures"))
from hf_llava import inputs_fn, model_fn  # noqa: E402  (tiny config, no download)


def main(steps=3, seq_len=19):  # 19: a length the group size need not divide
    dist.init_process_group("gloo")
    torch.manual_seed(0)  # same weights on every rank
    model = model_fn().double()
    batch = {k: v.double() if v.is_floating_point() else v
             for k, v in inputs_fn(2, seq_len, torch.Generator().manual_seed(0)).items()}
    if dist.get_rank() == 0:
        print(detect_model_sp_info(model).summary())
    auto_wrap_model_for_sp(model, dist.group.WORLD)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(steps):
        out = model(**batch)
        out.loss.backward()
        for p in model.parameters():  # SP convention: sum the ranks' gradients
            if p.grad is not None:  # LLaVA's last vision layer feeds nothing (feature layer -2)
                dist.all_reduce(p.grad)
        optimizer.step()
        optimizer.zero_grad()
        if dist.get_rank() == 0:
            print(f"step {i}: loss {out.loss.item():.12f}  logits on rank 0: {tuple(out.logits.shape)}")
    if dist.get_rank() == 0:
        one_device = model_fn().double()
        one_device.load_state_dict(model.state_dict())
        print(f"one device, same weights: loss {one_device(**batch).loss.item():.12f}")
        print(f"on the group:                   {model(**batch).loss.item():.12f}")
    else:
        model(**batch)  # rank 0's last forward needs every rank
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
