"""Summarise a py-spy raw (collapsed-stack) profile from `bench/run.py --profile`.

    python bench/profile_summary.py bench/out/profile-chats-100x10-sqlite.txt [--top 30]
                                    [--match app/]

Prints the functions with the most samples on top of the stack (self) and anywhere on it
(inclusive), as a share of all samples; --match keeps only frames whose text contains it.
"""
import argparse
from collections import Counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--match", default="")
    args = parser.parse_args()
    own, inclusive, total = Counter(), Counter(), 0
    with open(args.profile) as lines:
        for line in lines:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue  # (py-spy writes a frame whose text holds a newline across lines)
            samples = int(count)
            total += samples
            frames = stack.split(";")
            own[frames[-1]] += samples
            for frame in set(frames):
                inclusive[frame] += samples
    print(f"{total} samples")
    for title, counter in (("self", own), ("inclusive", inclusive)):
        print(f"\n-- {title} --")
        shown = 0
        for frame, samples in counter.most_common():
            if args.match and args.match not in frame:
                continue
            print(f"{100 * samples / total:6.1f}%  {frame}")
            shown += 1
            if shown == args.top:
                break


if __name__ == "__main__":
    main()
