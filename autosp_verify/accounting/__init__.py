"""Accounting: what a case costs per rank, next to what Ulysses needs at least.

One module per job: ``probe`` (what the reference and the ranks record), ``minimum`` (the
Ulysses minimum), ``saved`` (saved tensors and the single-device baseline), ``case`` (one case's
figures), ``compile_time``.

Three figures per case, in ``CaseResult.accounting`` (JSON) and the table's columns
``a2a/ar (min)``, ``sent/rank (min)``, ``mem/rank (1/P)`` and, when timed, ``compile s (no SP)``.

Collectives (``collectives``)
    Per training step (forward and backward) and per rank, by kind, and the bytes each rank
    sends to the other ranks. Measured only for impls whose step says ``autosp_counted``: an
    ``autosp.compile`` callable (the ``autosp*`` impls, or a user impl returning one) or
    ``autosp-wrap``'s step (its eager ops count the same way, adding all-gathers and
    reduce-scatters): autosp counts every
    collective its ops run, per thread (``autosp.collective_counts``), and its graph runs no
    other. ``measured`` is the rank that sends most (``per_rank``: every rank). Other impls show
    "-": nothing sound and non-global sees their collectives.

    The Ulysses minimum comes from the single-device reference: a torch-function mode records
    every ``scaled_dot_product_attention`` call (q/k/v shapes, ``enable_gqa``, and how many
    distinct key/value heads k and v really hold, since HF's ``repeat_kv`` copies them). Per
    attention, with H query heads, Hkv key/value heads, sequence S, P ranks, L = ceil(S/P):

    * 4 all-to-alls forward (q, k, v, out) and 4 backward (their gradients), each moving this
      rank's local tensor: q and out with ``Hq' = ceil(H/P)*P`` heads (padded to a multiple of
      P) and L positions; k and v with ``Hkv'`` heads: ``Hkv`` when P divides it, P when Hkv
      divides P (each rank gets the kv head of its query heads), otherwise ``Hq'`` (plain
      repetition; also whenever P does not divide H, as the padded heads then straddle groups);
    * 1 all-reduce of the loss (its numel x itemsize; no collective in the backward);
    * per ``conv1d`` or zero ``F.pad`` along the sequence (recorded too), one halo exchange each
      way: the positions of a rank's chunk other ranks' outputs read, and their gradients back.

    Bytes are counted the same way on both sides: autosp counts the bytes handed to each
    collective (numel x itemsize of the send buffer), the minimum the bytes of the same buffers,
    and both are turned into **bytes sent to other ranks**: x (P-1)/P for an all-to-all (the
    chunk for itself stays), x 2(P-1)/P for an all-reduce (ring).

Activation memory (``memory``)
    The tensors the autograd graph holds for the backward right after the forward: the peak of
    activation memory in a training step (parameters, buffers and the batch excluded; transient
    buffers inside the forward, e.g. all-to-all send buffers, are not in it). The graph
    is walked from ``loss.grad_fn``: builtin nodes expose ``_saved_*``, custom-function nodes
    (autosp's ops, AOTAutograd's ``CompiledFunctionBackward``) ``saved_tensors``; storages are
    counted once. Compared like with like: the single-device figure is the model run the way
    the ranks run it, without the passes: eager for eager impls, ``torch.compile(backend=X)``
    for an autosp impl with inner backend X (``aot_eager_decomp_partition`` standing in for
    Inductor: the same partitioner without codegen), the sequence dim marked dynamic as autosp
    marks it.

    Which tensors are *sequence-long* is measured, not guessed from sizes (a hidden size can
    equal B*S): everything is run a second time with the sequence P positions longer (the same
    padding), and a tensor whose shape changes in exactly one dim is sequence-long (activations,
    q/k/v after the all-to-all); in two dims *sequence-squared* ([.., S, S] masks and scores:
    Ulysses keeps the whole [S, S] of a head-broadcast mask on every rank, so 1/P is not its
    ideal); no dim: other. ``ratio`` (the table's column) is the largest rank's sequence-long
    bytes, sequence-squared ones included, over the single-device ones, next to the ideal 1/P;
    ``activation_ratio`` counts the sequence-long ones alone, ``seq2_ratio`` the squared ones
    alone, ``rank_seq2_bytes`` is the largest rank's squared bytes (the table marks a row whose
    ranks hold any), and ``total_ratio`` counts every saved tensor. When P does not divide S every
    rank holds L = ceil(S/P) positions, so the ideal is L/S (above 1/P).

Compile time (``compile_s``, opt-in: ``compile_time=True`` / ``--compile-time``)
    Seconds for ``autosp.compile(model, backend=X).warm_up(P, **batch)`` (Dynamo, the passes,
    AOTAutograd and X, and one forward and backward on a fake process group) against
    ``torch.compile(model, backend=X, fullgraph=True)`` plus one forward and backward on the full
    batch on one device; fresh model copies and fresh backend objects, ``torch._dynamo.reset()``
    before each side (so models compiled earlier in the process compile again on their next
    call), FX-graph and AOTAutograd caches off, sequence dim dynamic in both. Wall seconds, and
    this process's CPU seconds (``*_cpu``: steadier on a loaded machine; Inductor's compile
    workers are other processes and not in it). ``pairs`` of both sides back to back, the side
    first alternating: the seconds are medians, ``ratio`` the median of the pairs' ratios
    (``each_pair``). The table shows wall seconds and the ratio.
"""
from __future__ import annotations

from autosp_verify.accounting.case import BASELINE_BACKEND, NO_SP_RATIO, account, account_case, sequence_parallel
from autosp_verify.accounting.compile_time import compile_times
from autosp_verify.accounting.minimum import bytes_sent, ulysses_minimum
from autosp_verify.accounting.probe import NAME, Accounting, _sdpa_call
from autosp_verify.accounting.saved import baseline_saved, classify, saved_activations

__all__ = ["BASELINE_BACKEND", "NAME", "NO_SP_RATIO", "Accounting", "account", "account_case", "baseline_saved",
           "bytes_sent", "classify", "compile_times", "saved_activations", "sequence_parallel", "ulysses_minimum"]
