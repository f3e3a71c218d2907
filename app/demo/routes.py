"""The browser demo at / (DEMO=1)."""
from flask import Blueprint

bp = Blueprint("demo_page", __name__)
