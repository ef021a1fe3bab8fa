//! Synthetic degradations (light and heavy pipelines of the PFStorer supplement).
