"""benchmarks.scale.compare_outputs: what the kill run's "identical to the reference" rests on."""

from __future__ import annotations

from pathlib import Path

from benchmarks.scale import compare_outputs


def _scan(root: Path, uid: str, files: dict[str, bytes]) -> None:
    d = root / "scans" / uid
    for name, data in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)


def test_compare_outputs_lists_what_it_compared_and_what_differs(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    same = {"findings.csv": b"x,y\n1,2\n", "masks.json": b"{}", "overlays/001.png": b"png"}
    _scan(a, "s1", same)
    _scan(b, "s1", same)
    _scan(a, "s2", {"findings.csv": b"1\n", "overlays/001.png": b"png"})
    _scan(b, "s2", {"findings.csv": b"2\n", "candidates.csv": b"c\n"})
    compared, diffs = compare_outputs(a, b, ["s1", "s2"])
    # files absent from both folders (e.g. malignancy.csv) are not counted as compared
    assert sorted(compared) == ["s1/findings.csv", "s1/masks.json", "s1/overlays/001.png",
                                "s2/candidates.csv", "s2/findings.csv", "s2/overlays/001.png"]
    # a changed byte and a file that only one side has both count as differing
    assert sorted(diffs) == ["s2/candidates.csv", "s2/findings.csv", "s2/overlays/001.png"]
    assert compare_outputs(a, b, ["s1"]) == (["s1/findings.csv", "s1/masks.json", "s1/overlays/001.png"], [])
