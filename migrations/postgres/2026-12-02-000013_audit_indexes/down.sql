CREATE INDEX audit_events_patient ON audit_events (patient_id, recorded);
CREATE INDEX audit_events_recorded ON audit_events (recorded);
CREATE INDEX audit_patients_seq ON audit_patients (seq);
