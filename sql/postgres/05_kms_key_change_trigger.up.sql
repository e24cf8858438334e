-- Every writer announces its key changes, PostgreSQL.
--
-- kms_async's own writes log which scopes they changed (kms_key_change, file
-- 03) and notify listening instances. Other writers do not: the Go package,
-- a migration, or the README's SQL that deletes a tenant. Their changes
-- reached other instances only by polling, where a version without a log
-- row makes every instance compare every cached key with the database.
--
-- These triggers log and announce those writes too:
--
-- * after each insert or delete of a key row (a new or deleted root key
--   version or data key version, a deleted data key or root key), the
--   scope it belongs to is noted for the transaction (a transaction-local
--   setting, kms_key_change.scopes; more than 1000 scopes become "all");
-- * when a transaction that updated kms_collection_version commits (a
--   deferred trigger, so after all of its statements, in whatever order
--   they ran), each version it set that has no log row gets one, naming the
--   noted scopes, and a notification on the channel listening instances use.
--
-- kms_async marks its own transactions (kms_key_change.logged, set by the
-- statement that bumps the version), which the key row triggers skip in
-- their WHEN clause and the deferred trigger finds already logged: its own
-- writes cost one index lookup at commit, and the triggers never log them
-- twice. A version set in such a transaction that kms_async did not log
-- (another writer's bump in the same transaction), a bump with no noted
-- scope (an operator asking every instance to look) and a write with too
-- many scopes are logged as "all" (null): instances compare everything.
--
-- Key rows changed without bumping the version are still not announced, as
-- before: the version is the signal every writer must send.
--
-- Needs file 03. The Go package's tables and writes are unchanged by these
-- triggers (its role needs insert rights on kms_key_change). Static SQL
-- resolves names through search_path, so each function gets a fixed one
-- naming the tables' schema (looked up here), as in file 02. Safe to run twice.

create or replace function kms_key_change_note_scope()
  returns trigger
  language plpgsql
as $$
declare
  changed text;
  noted text;
begin
  if tg_table_name = 'kms_root_key' then
    changed := old.scope_id;
  elsif tg_table_name = 'kms_root_key_version' then
    select r.scope_id into changed
      from kms_root_key r
     where r.private_id = case when tg_op = 'DELETE' then old.root_key_id else new.root_key_id end;
  elsif tg_table_name = 'kms_data_key' then
    select r.scope_id into changed
      from kms_root_key r
     where r.private_id = old.root_key_id;
  else
    select r.scope_id into changed
      from kms_data_key k join kms_root_key r on r.private_id = k.root_key_id
     where k.private_id = case when tg_op = 'DELETE' then old.data_key_id else new.data_key_id end;
  end if;
  -- A row found without its scope was deleted along with its root key,
  -- whose own delete notes the scope.
  if changed is null then
    return null;
  end if;
  noted := nullif(current_setting('kms_key_change.scopes', true), '');
  if noted = '*' then
    return null;
  elsif noted is null then
    noted := jsonb_build_array(changed)::text;
  elsif not noted::jsonb @> jsonb_build_array(changed) then
    if jsonb_array_length(noted::jsonb) >= 1000 then
      noted := '*';
    else
      noted := (noted::jsonb || jsonb_build_array(changed))::text;
    end if;
  end if;
  perform set_config('kms_key_change.scopes', noted, true);
  return null;
end;
$$;

create or replace function kms_key_change_log_version()
  returns trigger
  language plpgsql
as $$
declare
  noted text;
  payload text;
begin
  if exists (select 1 from kms_key_change where version = new.version) then
    return null;
  end if;
  noted := nullif(current_setting('kms_key_change.scopes', true), '');
  if noted = '*' or coalesce(current_setting('kms_key_change.logged', true), '') = 'on' then
    noted := null;
  end if;
  insert into kms_key_change (version, scopes) values (new.version, noted);
  if new.version % 100 = 0 then
    delete from kms_key_change where version <= new.version - 10000;
  end if;
  payload := json_build_object('v', new.version, 's', noted::json)::text;
  if octet_length(payload) > 7000 then
    payload := json_build_object('v', new.version, 's', null)::text;
  end if;
  perform pg_notify('kms_key_change_' || tg_relid::text, payload);
  return null;
end;
$$;

do $migration$
declare
  tables_schema text := (
    select n.nspname
      from pg_class c join pg_namespace n on n.oid = c.relnamespace
     where c.oid = 'kms_collection_version'::regclass);
begin
  execute format(
    'alter function kms_key_change_note_scope() set search_path = %I, pg_temp', tables_schema);
  execute format(
    'alter function kms_key_change_log_version() set search_path = %I, pg_temp', tables_schema);
end;
$migration$;

drop trigger if exists kms_key_change_log on kms_collection_version;
create constraint trigger kms_key_change_log
  after update on kms_collection_version
  deferrable initially deferred
  for each row
  when (new.version is distinct from old.version)
  execute function kms_key_change_log_version();

drop trigger if exists kms_key_change_scope on kms_root_key;
create trigger kms_key_change_scope
  after delete on kms_root_key
  for each row
  when (coalesce(current_setting('kms_key_change.logged', true), '') <> 'on')
  execute function kms_key_change_note_scope();

drop trigger if exists kms_key_change_scope on kms_root_key_version;
create trigger kms_key_change_scope
  after insert or delete on kms_root_key_version
  for each row
  when (coalesce(current_setting('kms_key_change.logged', true), '') <> 'on')
  execute function kms_key_change_note_scope();

drop trigger if exists kms_key_change_scope on kms_data_key;
create trigger kms_key_change_scope
  after delete on kms_data_key
  for each row
  when (coalesce(current_setting('kms_key_change.logged', true), '') <> 'on')
  execute function kms_key_change_note_scope();

drop trigger if exists kms_key_change_scope on kms_data_key_version;
create trigger kms_key_change_scope
  after insert or delete on kms_data_key_version
  for each row
  when (coalesce(current_setting('kms_key_change.logged', true), '') <> 'on')
  execute function kms_key_change_note_scope();
