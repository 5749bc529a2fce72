"""Hypothesis strategies shared by the tests."""

from hypothesis import strategies as st

from pytest_gpttrace.trace import STAT_FIELDS, Iteration, Trace
from tests.builders import make_stats

any_float = st.floats(allow_nan=True, allow_infinity=True)
# Comparisons are checked on finite, moderate values: the tolerance arithmetic itself must not
# overflow or lose the boundary to rounding.
moderate = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
names = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12)


@st.composite
def stats(draw, values=any_float):
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    if 0 in shape:
        return make_stats(shape)  # empty: no statistics
    vals = {k: draw(values) for k in STAT_FIELDS}
    return make_stats(shape, dtype=draw(st.sampled_from(["torch.float32", "torch.bfloat16", "torch.int64"])),
                      device=draw(st.sampled_from(["cpu", "cuda:0"])), **vals,
                      nan=draw(st.integers(0, 9)), inf=draw(st.integers(0, 9)))


@st.composite
def traces(draw, values=any_float):
    iterations = []
    for i in range(draw(st.integers(0, 2))):
        iterations.append(Iteration(
            index=i,
            loss=draw(st.none() | values),
            stepped=draw(st.sampled_from([None, True, False])),
            lr=draw(st.dictionaries(names, st.floats(0, 1), max_size=2)),
            forward=draw(st.dictionaries(names, stats(values), max_size=3)),
            stage_grads=draw(st.dictionaries(names, stats(values), max_size=3)),
            param_grads=draw(st.dictionaries(names, st.none() | stats(values), max_size=3)),
        ))
    return Trace(config={"n_layer": 2, "softcap": 15.0}, environment={"torch": "2.13.0", "threads": 2},
                 iterations=tuple(iterations), parameters={"w": (3, 4)}, model="GPT")
