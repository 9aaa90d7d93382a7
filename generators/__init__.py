"""Generators: DSL records -> SQL DDL, topic configurations, JSON Schema and Avro schemas."""
