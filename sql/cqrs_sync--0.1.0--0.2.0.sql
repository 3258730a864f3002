/* sql/cqrs_sync--0.1.0--0.2.0.sql */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION cqrs_sync UPDATE TO '0.2.0'" to load this file. \quit

-- Every change made to cqrs_sync--0.2.0.sql relative to cqrs_sync--0.1.0.sql
-- is made here too, so that an updated installation has exactly the schema
-- of a fresh one (test/t/120_upgrade.pl compares pg_dump --schema-only of
-- both).  Rows are kept: nothing here drops a table that holds data.
