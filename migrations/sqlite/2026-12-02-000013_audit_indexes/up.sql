-- Indexes no query uses since audit_patients (000011) answers "which events name patient P", and
-- (recorded, seq) answers every date range: each cost an index insert on every audited request.
-- audit_patients (seq) served only the purge, which can scan.
DROP INDEX IF EXISTS audit_events_patient;
DROP INDEX IF EXISTS audit_events_recorded;
DROP INDEX IF EXISTS audit_patients_seq;
