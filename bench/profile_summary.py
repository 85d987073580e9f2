"""Summarizes py-spy's raw output (collapsed stacks: `frame;frame;...;frame COUNT` per line) into
where the time goes: the functions with the most samples on top of the stack (self), and those
on the stack at all (total), with the share of all active samples."""

from __future__ import annotations

import re
import sys
from collections import Counter

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    """`func (path/to/file.py:12)` -> `func (file.py)`: lines merged, paths shortened."""
    found = _FRAME.match(frame.strip())
    if not found:
        return frame.strip()
    path = found.group("file")
    for marker in (
        "site-packages/",
        "services/agent/",
        "services/directory/",
        "services/common/",
        "lib/python3",
    ):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{found.group('func')} ({path})"


def _is_project(frame: str) -> bool:
    """A frame of the project's own code, not counting the entry points that run the loop."""
    if any(p in frame for p in ("__main__.py", "p2pchat_common/serving.py")):
        return False
    return any(p in frame for p in ("p2pchat_agent/", "p2pchat_directory/", "p2pchat_common/"))


def summarize(raw: str, top: int = 30) -> str:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        if frames and frames[0].startswith(("thread ", "process ")):
            threads[
                frames[0].split(" (")[0] + " " + frames[0].split('"')[1]
                if '"' in frames[0]
                else frames[0]
            ] += count
            frames = [f for f in frames if not f.startswith(("thread ", "process "))]
        if not frames:
            continue
        samples += count
        names = [_short(f) for f in frames]
        own[names[-1]] += count
        project = [n for f, n in zip(frames, names, strict=True) if _is_project(f)]
        ours[project[-1] if project else "(outside p2pchat code: grpc, asyncio, runtime)"] += count
        for name in set(names):
            total[name] += count
    if samples == 0:
        return "no active samples\n"
    out = [
        f"{samples} samples\n",
        "by p2pchat function (the deepest project frame, with everything it calls):",
    ]
    out += [f"  {100 * c / samples:5.1f}%  {name}" for name, c in ours.most_common(top)]
    out += ["", "self (top of stack):"]
    out += [f"  {100 * c / samples:5.1f}%  {name}" for name, c in own.most_common(top)]
    out += ["", "total (anywhere on the stack):"]
    out += [f"  {100 * c / samples:5.1f}%  {name}" for name, c in total.most_common(top + 20)]
    if threads:
        out += ["", "threads:"]
        out += [f"  {100 * c / samples:5.1f}%  {name}" for name, c in threads.most_common(10)]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(summarize(open(sys.argv[1]).read(), int(sys.argv[2]) if len(sys.argv) > 2 else 30))
