"""FSDP2 + DTensor expert parallelism + DCP checkpoints on 2 and 4 gloo processes (CPU) equal
one process on the global batch (float32, 1e-5: reduction order only): at (dp, ep) in
{(1, 2), (2, 1)} and {(2, 2), (1, 4), (4, 1)} the keyed init is bitwise equal, every step's
per-parameter gradients (Adam would hide a W-fold error) and 3 AdamW steps (with an active
clip) match; DCP checkpoints move between every pair of those layouts and into one process
without a process group; a checkpoint missing a shard is a clear error. HSDP (dp_replicate x
dp_shard x ep in {2x1x2, 2x2x1, 4x1x1} on 4 processes): the same checks, and its checkpoints
move to and from FSDP layouts and one process. The per-process code is in dist_scenarios.py;
every launch has a hard timeout."""
from __future__ import annotations

import shutil

import pytest
import torch

import dist_scenarios as sc
from softmoe import distributed as smd
from test_distributed import assert_ok, launch

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """Both worlds' FSDP runs (their logs) and their checkpoints after step 3."""
    tmp = tmp_path_factory.mktemp("fsdp")
    logs = {world: assert_ok(launch("fsdp", world, tmp, timeout_s=900)) for world in (2, 4)}  # 2 shared cores
    return tmp, logs


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp_layouts_equal_one_process(fsdp_runs, world):
    _, logs = fsdp_runs
    for dp, ep in sc.layouts_of(world):
        assert f"ok fsdp dp={dp} ep={ep} fsdp: init, gradients, 3 steps match" in logs[world], logs[world]
    dp, ep = sc.layouts_of(world)[0]  # the sync_gradients oracle, no FSDP
    assert f"ok fsdp dp={dp} ep={ep} none: init, gradients, 3 steps match" in logs[world], logs[world]


@pytest.mark.parametrize("world", [2, 4])
def test_dcp_checkpoints_move_between_layouts(fsdp_runs, world):
    tmp, _ = fsdp_runs
    log = assert_ok(launch("fsdp_resume", world, tmp, timeout_s=900))
    for dp, ep in sc.layouts_of(world):
        assert f"ok resume dp={dp} ep={ep}: 5 checkpoints, step 4 matches" in log, log


@pytest.mark.parametrize("src", ["ck_dp1_ep2", "ck_dp2_ep1", "ck_dp2_ep2", "ck_dp1_ep4", "ck_dp4_ep1"])
def test_dcp_checkpoint_loads_in_one_process_without_a_process_group(fsdp_runs, src):
    tmp, _ = fsdp_runs
    check_loads_in_one_process(tmp, src, 2 if src in ("ck_dp1_ep2", "ck_dp2_ep1") else 4)


def check_loads_in_one_process(tmp, src, world):
    """Checkpoint `src` (after step 3 of `world` ranks' global batches) loads into a plain model
    and optimizer without a process group; the weights and the next step equal one process."""
    assert not torch.distributed.is_initialized()
    states, _, _ = sc.fsdp_reference(world, 4)
    model = sc.micro_model()
    opt = sc.make_optimizer(model)
    assert smd.load_checkpoint(tmp / src, model, opt) == {"step": 3}
    assert set(model.state_dict()) == set(states[3])
    sc.check_weights(model, states[3], f"one process from {src}")
    images, labels = sc.batches(world, 4)[3]
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), sc.MAX_NORM)
    opt.step()
    sc.check_weights(model, states[4], f"one process step 4 from {src}")


def test_dcp_writers_are_balanced_and_a_missing_shard_is_a_clear_error(fsdp_runs, tmp_path):
    tmp, _ = fsdp_runs
    files = smd.checkpoint.shard_files(tmp / "ck_dp2_ep2")
    assert files == [f"__{r}_0.distcp" for r in range(4)]  # every rank writes its own shards
    sizes = [(tmp / "ck_dp2_ep2" / f).stat().st_size for f in files]
    assert max(sizes) < 0.5 * sum(sizes), sizes  # replicated tensors spread over the ranks, not all on rank 0
    broken = tmp_path / "broken"
    shutil.copytree(tmp / "ck_dp2_ep2", broken)
    (broken / files[2]).unlink()
    model = sc.micro_model()
    with pytest.raises(ValueError, match=r"missing shard files \['__2_0.distcp'\]"):
        smd.load_checkpoint(broken, model)
    (broken / smd.checkpoint.MARKER).unlink()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        smd.load_checkpoint(broken, model)


@pytest.mark.parametrize("world", [2, 4])
def test_bf16_mixed_precision_gradients_are_within_the_bf16_bound(tmp_path, world):
    """FSDP at (dp, ep) = (1, 2) / (2, 2), HSDP at dp_replicate 2 x ep 2 and 2 x 2 x 1: step 2's
    gradients within the bf16 bound of float32, and at one ep_size equal across layouts."""
    log = assert_ok(launch("fsdp_bf16", world, tmp_path, timeout_s=300))
    for R, ep in sc.BF16_LAYOUTS[world]:
        assert f"ok bf16 mixed precision dp_replicate={R} ep={ep}:" in log, log


def test_dcp_parallel_checkpoint_keeps_every_ranks_rng_and_an_async_save_is_a_snapshot(tmp_path):
    """softmoe.train.parallel on 2 gloo ranks (scenario_ckpt_rng_async): each rank's own RNG
    states round-trip; an async save holds the state of the call, not of later updates; a
    missing rng file is a clear error on every rank. Then, in this process: the files' contents,
    the rule at another world size (rank 0's, logged) and at the same one (rank r's), and a
    rank file in the wrong place."""
    from softmoe.train import parallel
    from softmoe.train.checkpoint import load_state_file, load_train_state

    log = assert_ok(launch("ckpt_rng_async", 2, tmp_path, timeout_s=300))
    for line in ("ok per-rank rng", "ok async snapshot", "ok missing rng file"):
        assert line in log, log
    ckpt = tmp_path / "rng_async" / "checkpoints" / "step_00000001"
    state = load_train_state(ckpt)
    assert state["rng_ranks"] == 2
    ranks = [load_state_file(ckpt / parallel.rng_file(r), "RNG state") for r in range(2)]
    assert [(f["rank"], f["world_size"], f["step"]) for f in ranks] == [(0, 2, 1), (1, 2, 1)]
    assert not torch.equal(ranks[0]["rng"]["torch"], ranks[1]["rng"]["torch"])
    assert torch.equal(state["rng"]["torch"], ranks[0]["rng"]["torch"])  # train_state.pt: rank 0's
    said = []
    one = parallel.rng_to_restore(ckpt, state, None, said.append)  # one process: rank 0's, and it says so
    assert torch.equal(one["torch"], ranks[0]["rng"]["torch"])
    assert len(said) == 1 and "RNG states of 2 ranks and this run has 1: every rank resumes with rank 0's" in said[0]
    four = parallel.rng_to_restore(ckpt, state, smd.Mesh(world_size=4, rank=3, ep_size=2), said.append)
    assert torch.equal(four["torch"], ranks[0]["rng"]["torch"]) and len(said) == 2
    for r in range(2):  # the same world size, any (dp, ep) split: rank r's, silently
        got = parallel.rng_to_restore(ckpt, state, smd.Mesh(world_size=2, rank=r, ep_size=1), said.append)
        assert torch.equal(got["torch"], ranks[r]["rng"]["torch"]) and len(said) == 2
    swapped = tmp_path / "swapped"
    shutil.copytree(ckpt, swapped)
    shutil.copy(ckpt / parallel.rng_file(1), swapped / parallel.rng_file(0))
    with pytest.raises(ValueError, match=r"rank_0.pt' is not rank 0's RNG state of a 2-rank run: it holds rank=1"):
        parallel.rng_to_restore(swapped, state, smd.Mesh(world_size=2, rank=0, ep_size=2), said.append)
    (swapped / parallel.rng_file(1)).write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"rank_1.pt' is not a readable RNG state.*weights_only=True"):
        parallel.rng_to_restore(swapped, state, smd.Mesh(world_size=2, rank=1, ep_size=2), said.append)


def test_dcp_async_save_in_one_process_is_a_snapshot(tmp_path):
    """async_save_checkpoint without a process group: the weights and Adam state of the call
    are what loads back, bitwise, though the model changed before wait(); no COMPLETE until it."""
    model = sc.micro_model()
    opt = sc.make_optimizer(model)
    images, labels = sc.batches(1, 1)[0]
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    opt.step()
    before = sc.local_state(model, opt)
    pending = smd.async_save_checkpoint(tmp_path / "ck", model, opt, extra={"step": 1})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for st in opt.state.values():
        st["exp_avg"].zero_()
    assert pending.wait() == tmp_path / "ck" and (tmp_path / "ck" / smd.checkpoint.MARKER).is_file()
    fresh = sc.micro_model()
    fresh_opt = sc.make_optimizer(fresh)
    assert smd.load_checkpoint(tmp_path / "ck", fresh, fresh_opt) == {"step": 1}
    sc.assert_same_state(sc.local_state(fresh, fresh_opt), before, "one-process async checkpoint")


@pytest.fixture(scope="module")
def hsdp_runs(fsdp_runs):
    """The HSDP scenario's log; its checkpoints (ck_hsdp*) land beside the FSDP ones."""
    tmp, _ = fsdp_runs
    return tmp, assert_ok(launch("hsdp", 4, tmp, timeout_s=600))


@pytest.mark.parametrize("layout", sc.HSDP_LAYOUTS, ids=lambda t: "x".join(map(str, t)))
def test_hsdp_layouts_equal_one_process(hsdp_runs, layout):
    """(dp_replicate, dp_shard, ep): placements Replicate over dp_replicate, Shard over the rest;
    init bitwise; every step's gradients, 3 AdamW steps and the clip norms within 1e-5."""
    _, log = hsdp_runs
    R, S, ep = layout
    assert f"ok hsdp {R}x{S}x{ep} fsdp: init, gradients, 3 steps, clip norms match" in log, log
    if layout == sc.HSDP_LAYOUTS[0]:  # the sync_gradients path over the HSDP mesh's dp group
        assert f"ok hsdp {R}x{S}x{ep} none: init, gradients, 3 steps, clip norms match" in log, log


def test_hsdp_checkpoints_move_to_and_from_fsdp_and_one_process(hsdp_runs):
    """HSDP checkpoints load at (1,2,2), at dp=4 and at other HSDP layouts; FSDP (2,2) and (4,1)
    checkpoints and a single-process one (saved here, no process group) load under HSDP
    (sc.HSDP_RESUME); the weights and step 4 equal one process (1e-5). Then each HSDP
    checkpoint loads in one process without a process group."""
    tmp, _ = hsdp_runs
    model, opt, *_ = sc.fsdp_reference_run(4, 3)
    smd.save_checkpoint(tmp / "ck_single", model, opt, extra={"step": 3})
    log = assert_ok(launch("hsdp_resume", 4, tmp, timeout_s=600))
    for (R, S, ep), sources in sc.HSDP_RESUME.items():
        assert f"ok hsdp resume {R}x{S}x{ep}: {len(sources)} checkpoints, step 4 matches" in log, log
    for R, S, ep in sc.HSDP_LAYOUTS:
        check_loads_in_one_process(tmp, f"ck_hsdp{R}x{S}x{ep}", 4)
