package main

import (
	"encoding/json"
	"fmt"
	"strconv"
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
		d.fresh[i] = appendValue(nil, i, 1, size)
		d.update[i] = appendValue(nil, i, 2, size)
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

// appendValue appends a JSON object of exactly size bytes, shaped like a
// realtime record (numbers, a nested object, an array, a string), that
// differs with n and version.
func appendValue(dst []byte, n int, version int64, size int) []byte {
	start := len(dst)
	dst = append(dst, `{"n":`...)
	dst = strconv.AppendInt(dst, int64(n), 10)
	dst = append(dst, `,"version":`...)
	dst = strconv.AppendInt(dst, version, 10)
	dst = append(dst, `,"owner":"user-`...)
	dst = strconv.AppendInt(dst, int64(n%1000), 10)
	dst = append(dst, `","pos":{"x":`...)
	dst = strconv.AppendInt(dst, int64(n%360), 10)
	dst = append(dst, `.5,"y":-`...)
	dst = strconv.AppendInt(dst, int64(n%180)+version, 10)
	dst = append(dst, `.25},"speed":`...)
	dst = strconv.AppendInt(dst, int64(n%120), 10)
	dst = append(dst, `,"tags":["red","fast"],"note":"`...)
	for len(dst)-start < size-2 {
		dst = append(dst, byte('a'+(n+len(dst))%26))
	}
	return append(dst, `"}`...)
}
