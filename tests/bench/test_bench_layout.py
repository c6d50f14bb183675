"""The layout cost model (softmoe/bench/layout.py) against hand-computed figures."""
import pytest

from softmoe.bench import layout as L
from softmoe.models import count_params, create_model

TOY = L.ModelCounts(name="toy", experts=8, expert_params=8000, dense_params=1000, moe_layers=2, slots=8, dim=4,
                    hidden=16)


def test_toy_layouts_by_hand():
    # W=4, ep=2 -> dp=2, b = 16/4 = 4 sequences per rank, 16 state bytes, 4 comm bytes.
    ddp = L.layout_cost(TOY, world=4, ep=2, engine="ddp", global_batch=16)
    assert ddp["dp"] == 2 and ddp["b"] == 4
    assert ddp["memory GB/rank"] == pytest.approx((4000 + 1000) * 16 / 1e9)
    # all-to-all: 4 exchanges x (ep-1)/ep x S b D numbers x 4 bytes x 2 layers = 4 * 0.5 * 8*4*4 * 4 * 2
    assert ddp["all-to-all GB/step"] == pytest.approx(4 * 0.5 * 128 * 4 * 2 / 1e9)
    assert ddp["expert grad+param GB/step"] == pytest.approx(2 * 0.5 * 4000 * 4 / 1e9)  # ring all-reduce over dp=2
    assert ddp["dense grad+param GB/step"] == pytest.approx(2 * 0.75 * 1000 * 4 / 1e9)  # over W=4
    fsdp = L.layout_cost(TOY, world=4, ep=2, engine="fsdp", global_batch=16)
    assert fsdp["memory GB/rank"] == pytest.approx((4000 / 2 + 1000 / 4) * 16 / 1e9)
    assert fsdp["expert grad+param GB/step"] == pytest.approx(3 * 0.5 * 4000 * 4 / 1e9)  # 2 all-gathers + 1 RS
    assert fsdp["dense grad+param GB/step"] == pytest.approx(3 * 0.75 * 1000 * 4 / 1e9)
    assert fsdp["all-to-all GB/step"] == ddp["all-to-all GB/step"]
    one = L.layout_cost(TOY, world=1, ep=1, engine="fsdp", global_batch=16)  # one process: nothing moves
    assert one["total comm GB/step"] == 0 and one["memory GB/rank"] == pytest.approx(9000 * 16 / 1e9)


def test_counts_match_the_model():
    c = L.count_model("soft_moe_micro")
    assert c.expert_params + c.dense_params == count_params(create_model("soft_moe_micro"))
    assert (c.experts, c.slots, c.moe_layers) == (8, 8, 2)


def test_h14_256_figures_of_docs():
    """docs/distributed.md quotes these: 54B parameters, ~114 GB per rank at EP=8 with replicated experts,
    ~1.7 GB at 512 ranks fully sharded; FSDP's expert traffic / all-to-all = 1.5 H / (ep b P)."""
    c = L.count_model("soft_moe_h14", 256)
    assert (c.expert_params + c.dense_params) / 1e9 == pytest.approx(54.14, abs=0.01)
    assert L.layout_cost(c, 64, 8, "ddp", 4096)["memory GB/rank"] == pytest.approx(114.3, abs=0.1)
    assert L.layout_cost(c, 512, 256, "fsdp", 4096)["memory GB/rank"] == pytest.approx(1.69, abs=0.01)
    row = L.layout_cost(c, 64, 8, "fsdp", 4096)
    ratio = row["expert grad+param GB/step"] / row["all-to-all GB/step"]
    # 1.5 H / (ep b P) up to the experts' biases (b1, b2 add (H + D) / (2 D H) to the weights)
    assert ratio == pytest.approx(1.5 * 5120 / (8 * 64), rel=2e-3)


def test_default_eps_and_errors():
    assert L.default_eps(64, 256) == [1, 8, 64]
    assert L.default_eps(512, 256) == [1, 8, 256]
    assert L.default_eps(6, 8) == [1, 2]
    with pytest.raises(ValueError, match="ep=3"):
        L.layout_cost(TOY, 6, 3, "ddp", 12)
    with pytest.raises(ValueError, match="engine"):
        L.layout_cost(TOY, 4, 2, "zero", 16)
    with pytest.raises(ValueError, match="global-batch"):
        L.layout_cost(TOY, 4, 2, "ddp", 10)
    with pytest.raises(ValueError, match="Soft MoE model"):
        L.count_model("tc_moe_micro")


def test_cli_writes_tables(tmp_path, capsys):
    from softmoe.cli import main

    assert main(["bench", "layout", "--model", "soft_moe_micro", "--experts", "8", "--world", "2", "4",
                 "--global-batch", "32", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "layout.md").read_text()
    assert "| soft_moe_micro | 8 | 4 | 4 | 1 | fsdp |" in md
    assert (tmp_path / "layout.csv").read_text().count("\n") == 1 + 2 * 2 + 2 * 2  # W=2: ep 1, 2; W=4: ep 1, 4
    assert main(["bench", "layout", "--world", "3", "--out", str(tmp_path)]) == 2
    assert "--world" in capsys.readouterr().err
