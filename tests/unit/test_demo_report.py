"""``nanospec demo``'s report: three rows (no speculation, the head, the head with NanoSpec), which is fastest, and
exit 1 exactly when NanoSpec's outputs differ from the same head's without it."""

from __future__ import annotations

from nanospec_vllm.tools.demo import _KEYS, _report


def _mode(tps, texts, accepted=0.0, drafted=0.0, drafts=0.0):
    d = dict.fromkeys(_KEYS, 0.0)
    d[_KEYS[0]], d[_KEYS[1]], d[_KEYS[2]] = accepted, drafted, drafts
    return {"tps": tps, "texts": texts, "d": d}


def test_three_rows_and_the_fastest(capsys) -> None:
    modes = {"no-spec": _mode([30.0, 32.0], ["a", "b"]),
             "off": _mode([20.0, 22.0], ["a", "b"], 30, 90, 30),
             "on": _mode([27.0, 29.0], ["a", "b"], 30, 90, 30)}
    assert _report(modes, ["p", "q"]) == 0
    out = capsys.readouterr().out
    assert "no speculation" in out and "head, NanoSpec off" in out and "head + NanoSpec" in out
    assert "fastest here: no speculation (31.0 tok/s)" in out
    assert "1.33x the head without it, 0.90x no speculation" in out
    assert "head + NanoSpec vs the head without it: 2/2; vs no speculation: 2/2" in out
    assert " 2.00 " in out  # tau = 1 + 30/30 for the speculative rows


def test_a_nanospec_output_that_differs_fails(capsys) -> None:
    modes = {"no-spec": _mode([30.0], ["a"]), "off": _mode([20.0], ["a"]), "on": _mode([40.0], ["x"])}
    assert _report(modes, ["p"]) == 1
    assert "fastest here: head + NanoSpec" in capsys.readouterr().out
    # no speculation differing from speculation (bf16 numerics) is reported, not a failure
    modes = {"no-spec": _mode([30.0], ["z"]), "off": _mode([20.0], ["a"]), "on": _mode([40.0], ["a"])}
    assert _report(modes, ["p"]) == 0


def test_json_has_the_printed_figures(tmp_path, capsys) -> None:
    import json

    modes = {"no-spec": _mode([30.0, 32.0], ["a", "b"]),
             "off": _mode([20.0, 22.0], ["a", "b"], 30, 90, 30),
             "on": _mode([27.0, 29.0], ["a", "c"], 30, 90, 30)}
    out = tmp_path / "demo.json"
    assert _report(modes, ["p", "q"], str(out), {"setting": "eagle"}) == 1
    d = json.loads(out.read_text())
    assert d["setting"] == "eagle" and d["prompts"] == 2 and d["fastest"] == "no-spec"
    assert d["rows"]["on"]["tokens_per_s"] == 28.0 and d["rows"]["off"]["tau"] == 2.0
    assert (d["same_as_head"], d["same_as_no_spec"]) == (1, 1)
