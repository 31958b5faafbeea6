"""AutoSP from a DeepSpeed config (``autosp.deepspeed.initialize``): 4 gloo processes, P=2 x DP=2,
ZeRO stages 0 and 2 (2 under ``make test-all``; 1: test_peer_scenarios.py), three SGD steps, against single-device training on the same global batch.

The single-device reference is the same math as DP averaging: per step, ``loss = mean over the DP
replicas of each replica's whole-batch token-mean loss`` (each replica's batch has its own count
of valid labels), one backward, one SGD step. Each replica's loss per step and the final weights
must match within ``TOLERANCES[float32]``. Negative control: the same run with DeepSpeed told to
divide the DP x SP all-reduce by DP*SP (no P factor) fails the comparison."""
import os
import tempfile

import pytest
import torch

from autosp.errors import AutoSPError

WORLD, SP, STEPS, MICRO, SEQ, LR = 4, 2, 3, 2, 13, 0.2
ZERO0, ZERO2 = ("zero0", 0, False), ("zero2", 2, False)  # ZeRO-1: test_peer_scenarios.py
WRONG = ("wrong-reduction", 0, True)


def _ds_config(stage, sp=SP):
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
            "compile": {"deepcompile": True, "passes": ["autosp"]}, "sequence_parallel_size": sp,
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
            "gradient_clipping": 0.0, "steps_per_print": 10 ** 9}


def _loss(out):
    return out["loss"] if isinstance(out, dict) else out.loss


def _model():
    from fixtures.llama_style import model_fn
    torch.manual_seed(0)
    return model_fn()


def _batch(step, dp_rank):
    from fixtures.llama_style import inputs_fn
    return inputs_fn(MICRO, SEQ, torch.Generator().manual_seed(1000 * step + dp_rank))


def _worker(rank, runs, init_file, out_dir):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))  # as torchrun sets
    import torch.distributed as dist
    import autosp.deepspeed as asd
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(init_file, WORLD), rank=rank, world_size=WORLD)
    results = {}
    for name, stage, wrong in runs:
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        engine, *_ = asd.initialize(model=model, optimizer=opt, config=_ds_config(stage), backend="aot_eager")
        if wrong:  # divide the DP*SP all-reduce by DP*SP instead of DP: the SP sum loses its P
            engine.sequence_parallel_size = 1
            if hasattr(engine.optimizer, "sequence_parallel_size"):
                engine.optimizer.sequence_parallel_size = 1
        g = engine.autosp_groups
        losses = []
        for step in range(STEPS):
            loss = _loss(engine(**_batch(step, g.dp_rank)))
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        results[name] = {"dp_rank": g.dp_rank, "losses": losses,
                         "weights": {n: p.detach().clone() for n, p in model.named_parameters()}}
        dist.barrier()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _reference():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    per_replica = []
    for step in range(STEPS):
        losses = [_loss(model(**_batch(step, d))) for d in range(WORLD // SP)]
        torch.stack(losses).mean().backward()
        opt.step()
        opt.zero_grad()
        per_replica.append([x.item() for x in losses])
    return per_replica, {n: p.detach().clone() for n, p in model.named_parameters()}


def _compare(run, ref_losses, ref_weights):
    """Failures (strings) of one rank's run against the reference; [] when exact."""
    from autosp_verify.compare import TOLERANCES, check_tensor
    tol = TOLERANCES[torch.float32]
    failures = []
    for step, loss in enumerate(run["losses"]):
        c = check_tensor(f"loss[{step}]", torch.tensor(loss), torch.tensor(ref_losses[step][run["dp_rank"]]), tol)
        if not c.passed:
            failures.append(c.describe())
    worst = 0.0
    for name, ref in ref_weights.items():
        c = check_tensor(name, run["weights"][name], ref, tol)
        worst = max(worst, c.abs_err)
        if not c.passed:
            failures.append(c.describe())
    return failures, worst


def spawn_ranks(worker, *args, timeout=240):
    """``worker(rank, *args, init_file, out_dir)`` in WORLD spawned processes; each rank's saved
    results (``out_dir/rank{r}.pt``), in rank order."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=worker, args=(r, *args, os.path.join(tmp, "store"), tmp)) for r in range(WORLD)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        codes = [p.exitcode for p in procs]
        for p in procs:
            if p.is_alive():
                p.kill()
        assert codes == [0] * WORLD, f"worker exit codes {codes}"
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.mark.multiproc
@pytest.mark.parametrize("runs", [(ZERO0, WRONG), pytest.param((ZERO2,), marks=pytest.mark.slow)],
                         ids=["zero0", "zero2"])
def test_deepspeed_config_trains_exactly_on_gloo_dp2_sp2(runs):
    ranks = spawn_ranks(_worker, runs)
    ref_losses, ref_weights = _reference()
    report = [f"reference per-replica losses: {ref_losses}"]
    for name, _, wrong in runs:
        for r, res in enumerate(ranks):
            run = res[name]
            failures, worst = _compare(run, ref_losses, ref_weights)
            report.append(f"{name} rank{r} dp{run['dp_rank']}: losses {run['losses']} max|dw| {worst:.3g}")
            if wrong:
                assert failures, f"negative control passed on rank {r}: the comparison cannot see a P factor"
            else:
                assert not failures, (name, r, failures[:5])
    print("\n".join(report))


def _parse(config, world=4):
    from autosp.deepspeed import parse_config
    return parse_config(config, world)


def test_config_is_parsed_and_stripped():
    cfg, sp = _parse(_ds_config(1))
    assert sp == 2 and "compile" not in cfg and cfg["zero_optimization"] == {"stage": 1}
    original = _ds_config(0)
    original["compile"]["cache_dir"] = "x"  # other compile keys stay DeepSpeed's
    cfg, _ = _parse(original)
    assert cfg["compile"] == {"cache_dir": "x"} and original["compile"]["passes"] == ["autosp"]


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("compile"), 'no "compile" section'),
    (lambda c: c["compile"].update(passes=["autosp", "z1"]), "unknown or unsupported compile passes"),
    (lambda c: c["compile"].update(passes=[]), "non-empty list"),
    (lambda c: c["compile"].update(deepcompile=False), "deepcompile"),
    (lambda c: c.pop("sequence_parallel_size"), "sequence_parallel_size\" is required"),
    (lambda c: c.update(sequence_parallel_size=3), "does not divide the world size 4"),
    (lambda c: c.update(sequence_parallel_size=0), "positive int"),
    (lambda c: c.update(data_parallel_size=4), "!= world size"),
    (lambda c: c.update(zero_optimization={"stage": 3}), "ZeRO stage 3"),
])
def test_bad_configs_are_refused(change, message):
    cfg = _ds_config(0)
    change(cfg)
    with pytest.raises(AutoSPError, match=message.replace("(", r"\(")):
        _parse(cfg)


def test_initialize_needs_torch_distributed():
    import torch.distributed as dist
    from autosp.deepspeed import initialize
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(AutoSPError, match="not initialized"):
        initialize(model=torch.nn.Linear(2, 2), config=_ds_config(0))


def test_initialize_refuses_deepspeeds_dataloader():
    from autosp.deepspeed import initialize
    with pytest.raises(AutoSPError, match="training_data is not supported"):
        initialize(model=torch.nn.Linear(2, 2), config=_ds_config(0), training_data=[1])
