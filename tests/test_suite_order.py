"""The suite's own order (tests/conftest.py): the slowest tests start first, so that two workers end together."""

from conftest import SLOW_FIRST


def test_the_slow_tests_are_collected_first_and_each_entry_names_a_test(request):
    names = [item.nodeid.rsplit("/", 1)[-1] for item in request.session.items]
    files = {name.split("::")[0] for name in names}
    entries = [prefix for prefix in SLOW_FIRST if prefix.split("::")[0] in files]  # of the files collected now
    assert all(any(name.startswith(prefix) for name in names) for prefix in entries), "a renamed slow test"
    slow = [name for name in names if any(name.startswith(prefix) for prefix in entries)]
    assert names[: len(slow)] == slow
    first = [next(i for i, prefix in enumerate(entries) if name.startswith(prefix)) for name in slow]
    assert first == sorted(first)
