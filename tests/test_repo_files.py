"""The files a newcomer and a platform read first agree with the code: every setting the
server reads is documented in README.md and listed in .env.example; app.json deploys the
Procfile with PostgreSQL and Redis; LICENSE and .python-version match setup.cfg."""
from __future__ import annotations

import configparser
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
READ = re.compile(r"""(?:env\.get|environ\.get|_int|_bool|_list|_size)\(\s*(?:env,\s*)?["']([A-Z][A-Z0-9_]+)["']""")


def settings_read_by_the_server() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "app" / "config.py", ROOT / "gunicorn.conf.py"):
        names |= set(READ.findall(path.read_text()))
    return names


def test_the_settings_are_found_by_the_scan():
    names = settings_read_by_the_server()
    assert {"SECRET_KEY", "PYTHON_AGENTS", "HOST", "PORT", "MAX_CLIENT_QUEUE"} <= names, names


def test_every_setting_is_in_the_readme_configuration_table():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration"):]
    table = table[:table.index("\n## ", 4)]
    documented = set(re.findall(r"^\| `([A-Z_]+)`(?: / `([A-Z_]+)`)?", table, re.M))
    documented = {name for pair in documented for name in pair if name}
    missing = settings_read_by_the_server() - documented
    assert not missing, f"README.md's configuration table lacks {sorted(missing)}"


def test_every_setting_is_in_env_example():
    listed = set(re.findall(r"^# ([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))
    missing = settings_read_by_the_server() - listed
    assert not missing, f".env.example lacks {sorted(missing)}"


def test_app_json_deploys_the_procfile_with_postgresql_and_redis():
    app_json = json.loads((ROOT / "app.json").read_text())
    plans = {addon["plan"] for addon in app_json["addons"]}
    assert {"heroku-postgresql", "heroku-redis"} <= plans
    assert app_json["env"]["SECRET_KEY"]["generator"] == "secret"
    assert app_json["env"]["APP_ENV"]["value"] == "production"
    assert "web" in app_json["formation"]
    procfile = (ROOT / "Procfile").read_text()
    assert re.search(r"^release: flask --app wsgi db upgrade$", procfile, re.M)


def test_license_and_python_version_match_setup_cfg():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert setup["metadata"]["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    version = (ROOT / ".python-version").read_text().strip()
    assert setup["options"]["python_requires"] == f">={version}"
    assert (ROOT / "CHANGELOG.md").read_text().startswith("# Changelog")
