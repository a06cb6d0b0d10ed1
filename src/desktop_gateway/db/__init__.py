"""The database: models, engine and schema checks, and the queries the use cases need."""
