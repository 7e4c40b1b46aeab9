"""Small helpers shared by several test files (pytest puts this folder on sys.path)."""


def image_runs(ids: list[int]) -> list[tuple[int, int]]:
    """(value, length) of each run of image ids (< 0)."""
    runs = []
    for i in ids:
        if i < 0 and runs and runs[-1][0] == i:
            runs[-1] = (i, runs[-1][1] + 1)
        elif i < 0:
            runs.append((i, 1))
    return runs
