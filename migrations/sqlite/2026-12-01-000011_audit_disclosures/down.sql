DROP INDEX audit_events_recorded_seq;
DROP INDEX audit_events_action;
ALTER TABLE audit_events DROP COLUMN action;
DROP INDEX audit_patients_seq;
DROP TABLE audit_patients;
