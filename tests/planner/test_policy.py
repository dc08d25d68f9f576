import pytest

from fuyou.errors import ConfigError
from fuyou.policy import ActivationPolicy, BlockPolicy, parse_act_policy


def test_recompute_is_the_default_everywhere():
    p = parse_act_policy("recompute", 4)
    assert all(p.block(i) == BlockPolicy() for i in range(4))


def test_rules_apply_in_order_with_ranges():
    p = parse_act_policy("fc2=cpu;0-3:checkpoint=gpu;30-39:all=ssd;35:fc1=recompute", 40)
    assert p.block(0).fc2 == "cpu" and p.block(0).checkpoint == "gpu" and p.block(0).proj == "recompute"
    assert p.block(31).kept() == {"checkpoint": "ssd", "fc2": "ssd", "proj": "ssd", "qkv": "ssd", "fc1": "ssd"}
    assert p.block(35).fc1 == "recompute" and p.block(35).qkv == "ssd"
    q = parse_act_policy("fc2,proj=ssd", 2)
    assert q.block(1).fc2 == q.block(1).proj == "ssd" and q.block(1).qkv == "recompute"


def test_json_round_trip():
    p = parse_act_policy("fc2=cpu;1:qkv=gpu", 3, prefetch_depth=3, cache_weights_stages=2)
    q = ActivationPolicy.from_json(p.to_json())
    assert q == p and q.prefetch_depth == 3 and q.cache_weights_stages == 2


@pytest.mark.parametrize("text", ["", " ; ;", "fc3=cpu", "fc2=disk", "0-99:fc2=cpu", "a-b:fc2=cpu",
                                  "checkpoint=recompute", "fc2"])
def test_bad_human_policies_say_what_is_allowed(text):
    with pytest.raises(ConfigError, match="RULE|outside|recompute"):
        parse_act_policy(text, 40)


@pytest.mark.parametrize("raw", ['{"blocks": {"0": {"fc2": "disk"}}}', '{"blocks": {"x": {}}}', "{not json",
                                 '{"blocks": {}, "prefetch_depth": 0}', '{"blocks": {"0": {"checkpoint": "recompute"}}}'])
def test_bad_json_policies_raise_config_error(raw):
    with pytest.raises(ConfigError):
        ActivationPolicy.from_json(raw)


def test_describe_reads_back_to_the_same_policy():
    from fuyou.policy import ActivationPolicy, parse_act_policy
    for text in ("recompute", "all=gpu", "fc2,proj=ssd", "0-3:checkpoint=cpu;fc2=cpu;10-11:all=gpu", "5:qkv,fc1=ssd"):
        pol = parse_act_policy(text, 12)
        again = parse_act_policy(pol.describe(12), 12)
        assert again.blocks == pol.blocks, (text, pol.describe(12))
    assert parse_act_policy("fc2,proj=gpu;0-11:all=gpu", 24).describe(24) == \
        "0-11:fc2,proj,qkv,fc1=gpu;12-23:fc2,proj=gpu"
    assert ActivationPolicy.recompute_all(4).describe(4) == "recompute"


def test_a_block_keeping_its_classes_in_different_tiers_is_not_kept_whole():
    """A mutation audit: a block is kept whole (one graph in one tier) only when all its classes share one tier;
    every class kept, but in three tiers, stays a per-class policy."""
    from fuyou.policy import KeepPolicy, to_keep

    mixed = to_keep(parse_act_policy("fc2=gpu;proj=cpu;qkv=ssd;fc1=gpu", 1), 1)[0]
    assert mixed.all is None and mixed.classes == {"fc2": "gpu", "proj": "cpu", "qkv": "ssd", "fc1": "gpu"}
    assert to_keep(parse_act_policy("all=cpu", 1), 1)[0] == KeepPolicy(all="cpu")


@pytest.mark.parametrize("make,says", [
    (lambda: parse_act_policy("3-1:fc2=cpu", 8), "runs backwards; write it 1-3"),
    (lambda: ActivationPolicy(blocks={4: BlockPolicy()}).check_layers(4), "names block 4 but the model has 4 blocks"),
    (lambda: ActivationPolicy.from_json('{"blocks": {"-1": {}}}'), "block keys are block indices"),
])
def test_a_backward_range_a_block_past_the_last_and_a_negative_block_are_refused(make, says):
    """A mutation audit: a range written backwards, a block index equal to the model's block count and a negative
    block key are each refused, naming what is wrong."""
    with pytest.raises(ConfigError, match=says):
        make()
