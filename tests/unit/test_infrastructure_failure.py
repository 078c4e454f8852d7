"""What counts as the database (or the log) failing, rather than a handler: the consumer loop fails
the batch and starts over for the first, and retries and dead-letters the message for the second;
activation waits to record a delivery for the first."""

from __future__ import annotations

import asyncpg
import pytest
from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_dbapi
from sqlalchemy.exc import DBAPIError

from cdp_common.consumer import infrastructure_failure

DBAPI = AsyncAdapt_asyncpg_dbapi(asyncpg)


def as_sqlalchemy_raises_it(error: Exception) -> DBAPIError:
    """The asyncpg error as SQLAlchemy's asyncpg dialect hands it to the caller."""
    mapping = DBAPI._asyncpg_error_translate
    adapted = next(mapping[cls](str(error), error) for cls in type(error).__mro__ if cls in mapping)
    return DBAPIError.instance("SELECT 1", {}, adapted, DBAPI.Error)


@pytest.mark.parametrize("error", [
    asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
    asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.exceptions.CrashShutdownError("terminating connection because of crash of another server process"),
])
def test_a_server_restarting_or_a_lost_connection_is_infrastructure(error: Exception) -> None:
    assert infrastructure_failure(as_sqlalchemy_raises_it(error))


@pytest.mark.parametrize("error", [
    asyncpg.exceptions.UniqueViolationError("duplicate key value violates unique constraint"),
    asyncpg.exceptions.NumericValueOutOfRangeError("numeric field overflow"),
    asyncpg.exceptions.UndefinedColumnError('column "x" does not exist'),
])
def test_what_the_data_or_the_code_gets_wrong_is_the_handlers(error: Exception) -> None:
    assert not infrastructure_failure(as_sqlalchemy_raises_it(error))
