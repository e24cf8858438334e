-- The key change log, PostgreSQL.
--
-- One row per key write, keyed by the collection version the write bumped
-- kms_collection_version to, naming the scopes it changed (a JSON array of
-- scope ids, or null when there were too many to list). kms_async's writers
-- add the row in the same transaction as the bump. Since every key write
-- bumps that one row first and holds its lock until it commits, versions
-- commit in order: an instance that sees version V committed can read the
-- rows for every version up to V, and reload only the scopes they name.
--
-- A version without a row (a write by the Go package, which does not know
-- this table, or SQL an operator ran by hand) makes readers compare every
-- cached key with the database instead, as they do without this table.
-- Writers keep the newest rows only; an instance that has been away longer
-- also compares everything.
--
-- The Go package ignores this table. Safe to run twice.

create table if not exists kms_key_change (
  version bigint primary key,
  scopes text,
  create_time timestamptz not null default now()
);

comment on table kms_key_change is
  'kms_async: the scopes each key write changed, by collection version';
