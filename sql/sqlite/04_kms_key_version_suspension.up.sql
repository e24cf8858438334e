-- Suspended data key versions, SQLite.
--
-- A row here means: kms_async refuses to decrypt under this data key version
-- until the row is removed (KMS.resume_key_version). Suspension is the
-- reversible step before revoking a version: whatever still needs it fails
-- with an error that resuming undoes. Writers change this table in the same
-- transaction as the collection version bump that tells other instances.
--
-- The table has no foreign key to kms_data_key_version on purpose: tools
-- that look for tables referencing key versions (to find application rows
-- still encrypted under one) must not count it. Revoking a version through
-- kms_async deletes its row here too.
--
-- The Go package ignores this table: it still decrypts under a suspended
-- version. Safe to run twice.

create table if not exists kms_key_version_suspension (
  key_version_id text primary key,
  scope_id text not null,
  create_time timestamp not null default current_timestamp
);

create index if not exists kms_key_version_suspension_scope
  on kms_key_version_suspension (scope_id);
