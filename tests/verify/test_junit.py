"""JUnit XML: one testcase per verification case, the status mapped to failure/error/skipped, the
numbers as properties; and ``autosp-verify --junit-xml`` end to end (a failing impl as the control)."""
import xml.etree.ElementTree as ET

from autosp_verify.cli import main
from autosp_verify.junit import write_junit_xml
from autosp_verify.report import CaseResult

from .conftest import TINY, ulysses


def _case(status, world_size=2, **kw):
    return CaseResult("impls.py:ulysses", "threaded", world_size, 16, 2, "float64", status, **kw)


def _suite(path):
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    return suite


def _props(element):
    return {p.get("name"): p.get("value") for p in element.find("properties")}


def test_every_status_maps_to_its_junit_element(tmp_path):
    cases = [
        _case("pass", 1, loss_abs_err=0.0, max_grad_rel_err=1e-16,
              worst_tensor={"name": "loss", "abs_err": 0.0, "rel_err": 0.0}),
        _case("fail", 2, loss_abs_err=0.5, max_grad_rel_err=float("inf"),
              worst_tensor={"name": "grad w", "abs_err": 0.5, "rel_err": float("inf")},
              failures=["grad w: abs err 0.5, rel err inf", "logits: abs err 0.1, rel err 0.2"]),
        _case("error", 3, error="rank 1: RuntimeError: \x1b[31mboom\x1b[0m\ntraceback line"),
        _case("unsupported", 4, error="sequence length 18 is not divisible by 4 ranks"),
        _case("skipped", 5, error="skipped: needs 8 GPUs, found 0"),
        _case("structural", 6, structural=True),
    ]
    path = tmp_path / "report.xml"
    write_junit_xml(cases, path, model="/x/tiny_model.py")
    suite = _suite(path)  # parses: the escape character was made legal
    assert {k: suite.get(k) for k in ("tests", "failures", "errors", "skipped")} == \
        {"tests": "6", "failures": "1", "errors": "1", "skipped": "2"}
    assert _props(suite) == {"model": "/x/tiny_model.py", "verdict": "error"}
    tcs = suite.findall("testcase")
    assert [tc.get("name") for tc in tcs] == [f"impls.py:ulysses[threaded-P{p}-S16-B2-float64]" for p in range(1, 7)]
    assert {tc.get("classname") for tc in tcs} == {"tiny_model"}
    children = [[c.tag for c in tc if c.tag not in ("properties", "system-out")] for tc in tcs]
    assert children == [[], ["failure"], ["error"], ["skipped"], ["skipped"], []]
    passed, failed, errored, refused, skipped, structural = tcs
    assert failed.find("failure").get("message") == "grad w: abs err 0.5, rel err inf"
    assert "logits: abs err 0.1" in failed.find("failure").text
    assert _props(failed)["worst_tensor"] == "grad w" and _props(failed)["max_grad_rel_err"] == "inf"
    assert errored.find("error").get("message") == "rank 1: RuntimeError: ?[31mboom?[0m"
    assert refused.find("skipped").get("type") == "unsupported"
    assert refused.find("skipped").get("message").startswith("unsupported: the impl refused the model: sequence")
    assert skipped.find("skipped").get("message") == "skipped: needs 8 GPUs, found 0"
    assert _props(passed)["status"] == "pass" and _props(passed)["world_size"] == "1"
    assert _props(structural)["structural"] == "true" and "no numerics" in structural.find("system-out").text


def test_cli_writes_one_testcase_per_case(tmp_path, capsys):
    good, bad = tmp_path / "good.xml", tmp_path / "bad.xml"
    assert main([TINY, "--impl", ulysses(), "--world-size", "2,4", "--seq-len", "8,16", "--junit-xml", str(good)]) == 0
    suite = _suite(good)
    assert suite.get("tests") == "4" and suite.get("failures") == "0" and suite.get("errors") == "0"
    names = [tc.get("name") for tc in suite.findall("testcase")]
    assert names == [f"ulysses_impls.py:ulysses[threaded-P{p}-S{s}-B2-float64]" for p in (2, 4) for s in (8, 16)]
    assert not suite.findall("testcase/failure")
    # Negative control: a broken impl gives a failure element in every testcase.
    assert main([TINY, "--impl", ulysses("per_rank_mean"), "--world-size", "2,4", "--junit-xml", str(bad)]) == 1
    suite = _suite(bad)
    assert suite.get("tests") == "2" and suite.get("failures") == "2"
    assert all(tc.find("failure") is not None for tc in suite.findall("testcase"))
    assert _props(suite)["verdict"] == "fail"
    capsys.readouterr()


def test_no_report_without_the_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([TINY, "--impl", ulysses()]) == 0
    assert list(tmp_path.iterdir()) == []
    capsys.readouterr()
