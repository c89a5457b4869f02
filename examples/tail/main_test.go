package main

import (
	"testing"
	"time"

	"github.com/pgstore/pgstore"
	"github.com/stretchr/testify/require"
)

func TestFormat(t *testing.T) {
	at := time.Date(2026, 11, 21, 9, 30, 1, 250e6, time.UTC)
	require.Equal(t, `09:30:01.250 INSERT        "cars/bmw" version 3`,
		format(at, pgstore.Event{Type: pgstore.Insert, Table: "cars", ID: "bmw", Key: "cars/bmw", Version: 3}))
	require.Equal(t, `09:30:01.250 CREATE_TABLE  "cars"`, format(at, pgstore.Event{Type: pgstore.CreateTable, Table: "cars"}))
	require.Equal(t, `09:30:01.250 RESYNC        events may have been missed`, format(at, pgstore.Event{Type: pgstore.Resync}))
	require.Equal(t, `09:30:01.250 UPDATE        "cars/bmw" version 4 @0123456789abcdef0123456789abcdef.42`,
		format(at, pgstore.Event{Type: pgstore.Update, Key: "cars/bmw", Version: 4, Cursor: "0123456789abcdef0123456789abcdef.42"}))
	require.Equal(t, `09:30:01.250 RESYNC        pgstore: cursor older than the change log's retention @0123456789abcdef0123456789abcdef.50`,
		format(at, pgstore.Event{Type: pgstore.Resync, Reason: pgstore.ErrCursorExpired, Cursor: "0123456789abcdef0123456789abcdef.50"}))
}
