-- Key bindings and the key state record, SQLite.
--
-- kms_key_version_binding holds, for each root and data key version written
-- (or bound) by kms_async, a MAC that ties the wrapped key to its scope,
-- purpose, key id, version id and version number. The MAC key is derived
-- with HKDF from the version's own key material, so only a holder of the
-- root wrapper can make one; a database writer without it cannot move a
-- wrapped key to another place, renumber it or swap bindings undetected.
-- fingerprint is a one-way HKDF output of the version's key, so a copy of a
-- bound key under another id or in another place is recognised. Rows stay
-- when kms_async revokes a version (a copy of a revoked key is recognised
-- too); they are never a foreign key's target or source.
--
-- kms_key_state holds one record per scope, MACed under a key derived from
-- the scope's newest root key version: a serial number that every write
-- increases, the newest version of each key and the ids of revoked
-- versions. A revoked version whose row comes back stays refused, a deleted
-- newest version is noticed, and an instance that has seen a serial refuses
-- an older record.
--
-- Neither table has a foreign key to the Go tables on purpose: tools that
-- look for tables referencing key versions must not count them, and the Go
-- package, which ignores both tables, keeps reading and writing. Safe to run
-- twice.

create table if not exists kms_key_version_binding (
  key_version_id text primary key,
  scope_id text not null,
  binding blob not null,
  fingerprint blob,
  create_time timestamp not null default current_timestamp
);

create index if not exists kms_key_version_binding_scope
  on kms_key_version_binding (scope_id);

create index if not exists kms_key_version_binding_fingerprint
  on kms_key_version_binding (fingerprint);

create table if not exists kms_key_state (
  scope_id text primary key,
  serial bigint not null,
  root_key_version_id text not null,
  body blob not null,
  mac blob not null,
  update_time timestamp not null default current_timestamp
);
