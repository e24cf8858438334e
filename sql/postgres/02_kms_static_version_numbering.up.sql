-- Faster version numbering, PostgreSQL.
--
-- The numbering function of 01 builds its query as text for each inserted
-- row (so one function fits both version tables), and PostgreSQL parses and
-- plans that text every time: bulk key creation and rotation spent most of
-- their server time there. This replacement names the two tables in static
-- SQL, whose plans PL/pgSQL keeps for the session. The triggers of 01 call it
-- by name, so they pick it up unchanged; numbering stays the same (max + 1
-- per parent, ignoring any supplied value).
--
-- Static SQL resolves table names through search_path, so the function gets
-- a fixed search_path naming the schema that holds the tables (looked up
-- here, while the migration's search_path finds them), with pg_temp last:
-- inserts keep working when the tables' schema is not on the caller's
-- search_path, and no other schema's tables can stand in for them.
--
-- A database whose tables were made by the Go package's own migrations is
-- left alone: its triggers call the Go package's numbering function, and
-- kms_next_version() does not exist there.

do $migration$
begin
  if to_regprocedure('kms_next_version()') is null then
    return;
  end if;

  create or replace function kms_next_version()
    returns trigger
    language plpgsql
  as $$
  begin
    if tg_table_name = 'kms_data_key_version' then
      select coalesce(max(version), 0) + 1 into new.version
        from kms_data_key_version
       where data_key_id = new.data_key_id;
    elsif tg_table_name = 'kms_root_key_version' then
      select coalesce(max(version), 0) + 1 into new.version
        from kms_root_key_version
       where root_key_id = new.root_key_id;
    else
      raise exception 'kms_next_version() numbers kms_data_key_version and kms_root_key_version rows, not %.%',
        tg_table_schema, tg_table_name;
    end if;
    return new;
  end;
  $$;

  execute format(
    'alter function kms_next_version() set search_path = %I, pg_temp',
    (select n.nspname
       from pg_class c join pg_namespace n on n.oid = c.relnamespace
      where c.oid = 'kms_data_key_version'::regclass));
end;
$migration$;
