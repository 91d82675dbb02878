"""The twin's vessel trees: space-filling growth and curved branches (:meth:`VesselTree.bent`)."""

from __future__ import annotations

import numpy as np

from lidc_det.synthetic.anatomy import VesselTree, grow_tree


def _tree(seed: int = 0) -> VesselTree:
    rng = np.random.default_rng(seed)
    points = rng.uniform(-60.0, 60.0, size=(300, 3)) + np.array([0.0, 0.0, 100.0])
    return grow_tree(np.zeros(3), points, rng, leaf_radius=0.4, murray=2.8)


def _path_to_root(tree: VesselTree, i: int) -> list[int]:
    out = [i]
    while tree.parent[out[-1]] >= 0:
        out.append(int(tree.parent[out[-1]]))
        assert len(out) <= len(tree.nodes), "parent chain has a cycle"
    return out


def test_bent_tree_keeps_branch_points_and_topology() -> None:
    tree = _tree()
    bent = tree.bent(np.random.default_rng(1), bend=0.12, piece_mm=4.0)
    n = len(tree.nodes)
    assert len(bent.nodes) > n
    np.testing.assert_array_equal(bent.nodes[:n], tree.nodes)  # every old node stays where it was
    np.testing.assert_array_equal(bent.radius[:n], tree.radius)
    # walking up from an old node through the new nodes reaches the same old ancestors in order
    for i in range(1, n, 17):
        old_chain = [k for k in _path_to_root(bent, i) if k < n]
        assert old_chain == _path_to_root(tree, i)
    # the new nodes are interior points: one parent and one child each
    kids = np.bincount(bent.parent[bent.parent >= 0], minlength=len(bent.nodes))
    assert np.all(kids[n:] == 1)
    # no piece longer than about piece_mm (the bow lengthens pieces a little)
    tubes = bent.tubes()
    assert np.linalg.norm(tubes.b_xyz - tubes.a_xyz, axis=1).max() < 4.0 * 1.6


def test_bent_branches_bow_sideways_within_bounds_and_taper() -> None:
    tree = _tree()
    bend = 0.12
    bent = tree.bent(np.random.default_rng(2), bend=bend)
    n = len(tree.nodes)
    # for each new node: its distance from the straight chord of its branch, relative to the branch length
    child_of = {int(p): c for c, p in enumerate(bent.parent) if p >= n}  # a new node has one child
    rel = []
    for i in range(n, min(len(bent.nodes), n + 400)):
        a = int(bent.parent[i])
        while a >= n:
            a = int(bent.parent[a])
        b = i
        while b >= n:
            b = child_of[b]
        chord = bent.nodes[b] - bent.nodes[a]
        L = float(np.linalg.norm(chord))
        off = bent.nodes[i] - bent.nodes[a]
        rel.append(float(np.linalg.norm(off - (off @ chord) / (L * L) * chord)) / L)
        r_start = bent.radius[a] if bent.parent[a] >= 0 else bent.radius[b]
        lo, hi = sorted((float(bent.radius[b]), float(r_start)))
        assert lo - 1e-9 <= bent.radius[i] <= hi + 1e-9
    rel_a = np.asarray(rel)
    assert rel_a.max() <= bend * (1.7 + 0.5) + 1e-9  # |a1| + |a2| at most
    assert np.median(rel_a) > 0.01  # the branches do bow
    # no bend: the same tree
    assert tree.bent(np.random.default_rng(0), bend=0.0) is tree
