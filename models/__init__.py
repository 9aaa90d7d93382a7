"""DSL records: the single source of truth for topics, tables and schemas."""

from models.dsl import StreamRecord, TableSpec, TopicSpec, check_registry
from models.market import CryptoMarketAnalytics, CryptoOHLCVData, CryptoPriceData
from models.types import DSLError

# Every record type the application streams and stores. Adding a class here gives it a topic,
# a hypertable, schemas and a running sink.
RECORDS: tuple[type[StreamRecord], ...] = (CryptoPriceData, CryptoOHLCVData, CryptoMarketAnalytics)
check_registry(RECORDS)

__all__ = [
    "RECORDS",
    "CryptoMarketAnalytics",
    "CryptoOHLCVData",
    "CryptoPriceData",
    "DSLError",
    "StreamRecord",
    "TableSpec",
    "TopicSpec",
]
