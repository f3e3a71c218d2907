"""The server's distribution: its dependencies are requirements.txt's pins (one list)."""
from pathlib import Path

from setuptools import setup


def requirements() -> list[str]:
    lines = Path(__file__).with_name("requirements.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines
            if line.split("#")[0].strip() and not line.startswith("-")]


setup(install_requires=requirements())
