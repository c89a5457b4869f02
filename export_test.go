package pgstore

// StageMinRows is the number of sets to one table from which a batch is
// copied through the staging table, for tests that must cross it.
const StageMinRows = stageMinRows
