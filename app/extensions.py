"""Extensions, created once at import and bound to an app with ``init_app``."""
from flask_migrate import Migrate
from flask_smorest import Api
from flask_socketio import SocketIO
from flask_sqlalchemy import SQLAlchemy
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from sqlalchemy import MetaData

from app.errors import from_http_exception, error_response

# Constraint names are fixed so that migrations are identical on SQLite and PostgreSQL.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

db = SQLAlchemy(metadata=MetaData(naming_convention=NAMING_CONVENTION))
migrate = Migrate()
socketio = SocketIO()
limiter = Limiter(key_func=get_remote_address)


class ChatApi(Api):
    """flask-smorest's Api, rendering every HTTP error in the contract's envelope."""

    def handle_http_exception(self, error):
        api_error, headers = from_http_exception(error)
        return error_response(api_error, headers)


api = ChatApi()
