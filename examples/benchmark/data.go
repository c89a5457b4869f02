package main

import (
	"encoding/json"
	"fmt"

	"github.com/pgstore/pgstore/internal/benchkit"
)

// dataset is the records of a write figure: ids, and a value for the first
// write (fresh keys) and for the second (updates) of each.
type dataset struct {
	ids           []string
	fresh, update []json.RawMessage
}

func newDataset(n, size int) *dataset {
	d := &dataset{ids: make([]string, n), fresh: make([]json.RawMessage, n), update: make([]json.RawMessage, n)}
	for i := range n {
		d.ids[i] = fmt.Sprintf("k%08d", i)
		d.fresh[i] = benchkit.AppendValue(nil, i, 1, size)
		d.update[i] = benchkit.AppendValue(nil, i, 2, size)
	}
	return d
}

// keys returns the pgstore keys of the dataset's records in table.
func (d *dataset) keys(table string) []string {
	keys := make([]string, len(d.ids))
	for i, id := range d.ids {
		keys[i] = table + "/" + id
	}
	return keys
}
