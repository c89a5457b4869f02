package pgstore_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/pgtest"
)

// The examples need a PostgreSQL server, found as the tests find theirs (see
// internal/pgtest). Each works in a schema of its own, dropped at its end.

func exampleDatabaseURL() string {
	url, err := pgtest.Find() // as the tests: a local server, or a container
	if err != nil {
		log.Fatal(err)
	}
	return url
}

// exampleSchema drops what a previous run may have left in schema, and
// returns a function that drops the schema again.
func exampleSchema(schema string) (drop func()) {
	drop = func() {
		ctx := context.Background()
		conn, err := pgx.Connect(ctx, exampleDatabaseURL())
		if err != nil {
			log.Fatal(err)
		}
		defer conn.Close(ctx)
		if _, err := conn.Exec(ctx, "DROP SCHEMA IF EXISTS "+pgx.Identifier{schema}.Sanitize()+" CASCADE"); err != nil {
			log.Fatal(err)
		}
	}
	drop()
	return drop
}

type car struct {
	Model string `json:"model"`
	HP    int    `json:"hp"`
}

func ExampleConnect() {
	defer exampleSchema("pgstore_example_connect")()
	ctx := context.Background()

	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_connect"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx) // flushes every accepted write

	if err := c.Set(ctx, "cars/bmw", 1, car{Model: "bmw", HP: 300}); err != nil {
		log.Fatal(err)
	}
	rec, err := c.Get(ctx, "cars/bmw")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(rec.Version, string(rec.Value))
	// Output:
	// 1 {"hp": 300, "model": "bmw"}
}

// Settings that arrive apart (host, port, user, password, database, TLS
// files, pool size: from flags or environment variables, as realtime servers
// take them) map onto a pgx config: parse an empty connection string for
// pgx's defaults and the PG* variables, then set the fields. pgx builds the
// TLS configuration only while it parses, so TLS settings go in the string,
// as key=value pairs with quoted values.
func ExampleNew_discreteSettings() {
	defer exampleSchema("pgstore_example_discrete")()
	ctx := context.Background()
	found, err := pgx.ParseConfig(exampleDatabaseURL()) // stands for the settings given
	if err != nil {
		log.Fatal(err)
	}
	host, port, user, password, database := found.Host, found.Port, found.User, found.Password, found.Database
	sslmode, poolSize := "prefer", int32(8)

	quote := strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace
	cfg, err := pgxpool.ParseConfig("sslmode='" + quote(sslmode) + "'") // and sslrootcert, sslcert, sslkey
	if err != nil {
		log.Fatal(err)
	}
	cfg.ConnConfig.Host = host
	cfg.ConnConfig.Port = port
	cfg.ConnConfig.User = user
	cfg.ConnConfig.Password = password
	cfg.ConnConfig.Database = database
	cfg.MaxConns = poolSize
	cfg.ConnConfig.RuntimeParams["application_name"] = pgstore.DefaultApplicationName // as Connect does
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()

	c, err := pgstore.New(ctx, pool, pgstore.WithSchema("pgstore_example_discrete"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)
	if err := c.Set(ctx, "cars/bmw", 1, car{Model: "bmw", HP: 300}); err != nil {
		log.Fatal(err)
	}
	fmt.Println("pool size:", pool.Config().MaxConns)
	// Output:
	// pool size: 8
}

func ExampleNew() {
	defer exampleSchema("pgstore_example_new")()
	ctx := context.Background()

	pool, err := pgxpool.New(ctx, exampleDatabaseURL())
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()

	c, err := pgstore.New(ctx, pool, pgstore.WithSchema("pgstore_example_new"))
	if err != nil {
		log.Fatal(err)
	}
	if err := c.Set(ctx, "cars/bmw", 1, car{Model: "bmw", HP: 300}); err != nil {
		log.Fatal(err)
	}
	if err := c.Close(ctx); err != nil {
		log.Fatal(err)
	}

	// Close left the caller's pool open.
	var n int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM pgstore_example_new.cars`).Scan(&n); err != nil {
		log.Fatal(err)
	}
	fmt.Println("records in cars:", n)
	// Output:
	// records in cars: 1
}

func ExampleConnector_Set() {
	defer exampleSchema("pgstore_example_set")()
	ctx := context.Background()
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_set"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)

	// "cars/bmw" is the record "bmw" of the table "cars", created on this
	// first write. Set returns once the record is durable.
	if err := c.Set(ctx, "cars/bmw", 1, map[string]any{"model": "bmw", "hp": 300}); err != nil {
		log.Fatal(err)
	}
	// A value may also be JSON text.
	if err := c.Set(ctx, "cars/vw", 1, []byte(`{"model": "vw", "hp": 90}`)); err != nil {
		log.Fatal(err)
	}
	// A value jsonb cannot hold is refused before it is buffered.
	err = c.Set(ctx, "cars/ghost", 1, nil)
	fmt.Println(errors.Is(err, pgstore.ErrInvalidValue))

	rows, err := c.Query(ctx, `SELECT id, val->>'hp' FROM pgstore_example_set.cars ORDER BY id`)
	if err != nil {
		log.Fatal(err)
	}
	for rows.Next() {
		var id, hp string
		if err := rows.Scan(&id, &hp); err != nil {
			log.Fatal(err)
		}
		fmt.Println(id, hp)
	}
	if err := rows.Err(); err != nil {
		log.Fatal(err)
	}
	// Output:
	// true
	// bmw 300
	// vw 90
}

func ExampleConnector_SetAsync() {
	defer exampleSchema("pgstore_example_setasync")()
	ctx := context.Background()
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_setasync"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)

	// SetAsync accepts the writes in call order without waiting for them;
	// each Result reports when its write is durable, or why it failed.
	var results []*pgstore.Result
	for speed := 10; speed <= 50; speed += 10 {
		results = append(results, c.SetAsync(ctx, "cars/bmw", int64(speed/10), map[string]int{"speed": speed}))
	}
	for _, res := range results {
		if err := res.Wait(ctx); err != nil {
			log.Fatal(err)
		}
	}

	// The last write wins.
	rec, err := c.Get(ctx, "cars/bmw")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(rec.Version, string(rec.Value))
	// Output:
	// 5 {"speed": 50}
}

func ExampleResult_Wait() {
	defer exampleSchema("pgstore_example_wait")()
	ctx := context.Background()
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_wait"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)

	res := c.SetAsync(ctx, "cars/bmw", 1, car{Model: "bmw", HP: 300})
	// ... do other work while the write is flushed ...
	fmt.Println("durable:", res.Wait(ctx) == nil)

	// A write that is refused at once reports it through its Result too.
	res = c.SetAsync(ctx, "/bmw", 1, car{Model: "bmw"})
	fmt.Println("invalid key:", errors.Is(res.Wait(ctx), pgstore.ErrInvalidKey))
	// Output:
	// durable: true
	// invalid key: true
}

func ExampleConnector_Get() {
	defer exampleSchema("pgstore_example_get")()
	ctx := context.Background()
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_get"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)

	if err := c.Set(ctx, "cars/bmw", 7, car{Model: "bmw", HP: 300}); err != nil {
		log.Fatal(err)
	}
	rec, err := c.Get(ctx, "cars/bmw")
	if err != nil {
		log.Fatal(err)
	}
	var bmw car
	if err := json.Unmarshal(rec.Value, &bmw); err != nil {
		log.Fatal(err)
	}
	fmt.Printf("version %d: %s with %d hp\n", rec.Version, bmw.Model, bmw.HP)

	_, err = c.Get(ctx, "cars/trabant")
	fmt.Println(errors.Is(err, pgstore.ErrNotFound))
	// Output:
	// version 7: bmw with 300 hp
	// true
}

func ExampleConnector_Delete() {
	defer exampleSchema("pgstore_example_delete")()
	ctx := context.Background()
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_delete"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)

	if err := c.Set(ctx, "cars/bmw", 1, car{Model: "bmw"}); err != nil {
		log.Fatal(err)
	}
	if err := c.Delete(ctx, "cars/bmw"); err != nil {
		log.Fatal(err)
	}
	_, err = c.Get(ctx, "cars/bmw")
	fmt.Println(errors.Is(err, pgstore.ErrNotFound))

	// Deleting what is not there succeeds.
	fmt.Println(c.Delete(ctx, "cars/bmw"))
	// Output:
	// true
	// <nil>
}

func ExampleWithVersionGuard() {
	defer exampleSchema("pgstore_example_guard")()
	ctx := context.Background()
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(),
		pgstore.WithSchema("pgstore_example_guard"), pgstore.WithVersionGuard(true))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)

	if err := c.Set(ctx, "cars/bmw", 2, car{Model: "bmw", HP: 300}); err != nil {
		log.Fatal(err)
	}
	// A write of an older version is refused instead of overwriting newer data.
	err = c.Set(ctx, "cars/bmw", 1, car{Model: "bmw", HP: 90})
	fmt.Println(errors.Is(err, pgstore.ErrVersionConflict))
	// The same version again goes through, so retrying a write is harmless.
	fmt.Println(c.Set(ctx, "cars/bmw", 2, car{Model: "bmw", HP: 300}))

	rec, err := c.Get(ctx, "cars/bmw")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(rec.Version, string(rec.Value))
	// Output:
	// true
	// <nil>
	// 2 {"hp": 300, "model": "bmw"}
}

func ExampleWithWriteInterval() {
	defer exampleSchema("pgstore_example_interval")()
	ctx := context.Background()
	url := exampleDatabaseURL()
	// Writes wait up to a second, so that quick updates of a record coalesce.
	c, err := pgstore.Connect(ctx, url,
		pgstore.WithSchema("pgstore_example_interval"), pgstore.WithWriteInterval(time.Second))
	if err != nil {
		log.Fatal(err)
	}
	for speed := 1; speed <= 60; speed++ {
		// Each Result could be waited for; Close below reports nothing lost.
		c.SetAsync(ctx, "cars/bmw", int64(speed), map[string]int{"speed": speed})
	}
	// Reads see buffered writes.
	printSpeed(ctx, c, "buffered")
	// Close flushes every accepted write.
	if err := c.Close(ctx); err != nil {
		log.Fatal(err)
	}

	c, err = pgstore.Connect(ctx, url, pgstore.WithSchema("pgstore_example_interval"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)
	printSpeed(ctx, c, "stored")
	// Output:
	// buffered: version 60, speed 60
	// stored: version 60, speed 60
}

func printSpeed(ctx context.Context, c *pgstore.Connector, label string) {
	rec, err := c.Get(ctx, "cars/bmw")
	if err != nil {
		log.Fatal(err)
	}
	var v struct{ Speed int }
	if err := json.Unmarshal(rec.Value, &v); err != nil {
		log.Fatal(err)
	}
	fmt.Printf("%s: version %d, speed %d\n", label, rec.Version, v.Speed)
}

func ExampleWithTablePolicy() {
	defer exampleSchema("pgstore_example_policy")()
	ctx := context.Background()
	errUnknownTable := errors.New("unknown table")
	allowed := map[string]bool{"cars": true, "users": true}
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(),
		pgstore.WithSchema("pgstore_example_policy"),
		pgstore.WithTablePolicy(func(table string) error {
			if !allowed[table] {
				return errUnknownTable
			}
			return nil
		}))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)

	fmt.Println(c.Set(ctx, "cars/bmw", 1, car{Model: "bmw"}))
	err = c.Set(ctx, "spam1234/x", 1, "y")
	fmt.Println(errors.Is(err, errUnknownTable))
	// Output:
	// <nil>
	// true
}

// printEvent prints an event as "TYPE table" or "TYPE key version".
func printEvent(e pgstore.Event) {
	switch e.Type {
	case pgstore.CreateTable, pgstore.DestroyTable:
		fmt.Println(e.Type, e.Table)
	default:
		fmt.Println(e.Type, e.Key, "version", e.Version)
	}
}

func ExampleConnector_Subscribe() {
	defer exampleSchema("pgstore_example_subscribe")()
	ctx := context.Background()
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_subscribe"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)

	// The handler runs on the subscription's own goroutine, one event at a
	// time; here it hands them over.
	events := make(chan pgstore.Event, 16)
	sub, err := c.Subscribe(ctx, func(e pgstore.Event) { events <- e })
	if err != nil {
		log.Fatal(err)
	}
	defer sub.Close(ctx)

	// Every change committed after Subscribe returns is delivered, from
	// this connector or any other on the schema.
	if err := c.Set(ctx, "cars/bmw", 1, car{Model: "bmw", HP: 300}); err != nil {
		log.Fatal(err)
	}
	if err := c.Set(ctx, "cars/bmw", 2, car{Model: "bmw", HP: 310}); err != nil {
		log.Fatal(err)
	}
	if err := c.Delete(ctx, "cars/bmw"); err != nil {
		log.Fatal(err)
	}
	for range 4 {
		printEvent(<-events)
	}
	// Output:
	// CREATE_TABLE cars
	// INSERT cars/bmw version 1
	// UPDATE cars/bmw version 2
	// DELETE cars/bmw version 2
}

func ExampleForTables() {
	defer exampleSchema("pgstore_example_fortables")()
	ctx := context.Background()
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_fortables"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)

	events := make(chan pgstore.Event, 16)
	sub, err := c.Subscribe(ctx, func(e pgstore.Event) { events <- e }, pgstore.ForTables("cars"))
	if err != nil {
		log.Fatal(err)
	}
	defer sub.Close(ctx)

	if err := c.Set(ctx, "bikes/bmx", 1, "not for this subscription"); err != nil {
		log.Fatal(err)
	}
	if err := c.Set(ctx, "cars/bmw", 1, car{Model: "bmw", HP: 300}); err != nil {
		log.Fatal(err)
	}
	printEvent(<-events)
	printEvent(<-events)
	// Output:
	// CREATE_TABLE cars
	// INSERT cars/bmw version 1
}

func ExampleForEvents() {
	defer exampleSchema("pgstore_example_forevents")()
	ctx := context.Background()
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_forevents"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)

	// Only changes and removals of existing records.
	events := make(chan pgstore.Event, 16)
	sub, err := c.Subscribe(ctx, func(e pgstore.Event) { events <- e },
		pgstore.ForEvents(pgstore.Update, pgstore.Delete))
	if err != nil {
		log.Fatal(err)
	}
	defer sub.Close(ctx)

	for version := int64(1); version <= 2; version++ {
		if err := c.Set(ctx, "cars/bmw", version, car{Model: "bmw", HP: 300}); err != nil {
			log.Fatal(err)
		}
	}
	if err := c.Delete(ctx, "cars/bmw"); err != nil {
		log.Fatal(err)
	}
	printEvent(<-events)
	printEvent(<-events)
	// Output:
	// UPDATE cars/bmw version 2
	// DELETE cars/bmw version 2
}

func ExampleForSchema() {
	defer exampleSchema("pgstore_example_forschema")()
	defer exampleSchema("pgstore_example_forschema_shop")()
	ctx := context.Background()
	url := exampleDatabaseURL()
	c, err := pgstore.Connect(ctx, url, pgstore.WithSchema("pgstore_example_forschema"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)
	// Another application keeps its records in a schema of its own.
	shop, err := pgstore.Connect(ctx, url, pgstore.WithSchema("pgstore_example_forschema_shop"))
	if err != nil {
		log.Fatal(err)
	}
	defer shop.Close(ctx)

	events := make(chan pgstore.Event, 16)
	sub, err := c.Subscribe(ctx, func(e pgstore.Event) { events <- e },
		pgstore.ForSchema("pgstore_example_forschema_shop"), pgstore.ForEvents(pgstore.Insert))
	if err != nil {
		log.Fatal(err)
	}
	defer sub.Close(ctx)

	if err := shop.Set(ctx, "orders/1", 1, map[string]int{"total": 42}); err != nil {
		log.Fatal(err)
	}
	e := <-events
	fmt.Println(e.Schema, e.Type, e.Key)
	// Output:
	// pgstore_example_forschema_shop INSERT orders/1
}

func ExampleWithEvents() {
	defer exampleSchema("pgstore_example_withevents")()
	ctx := context.Background()
	// Only inserts and deletes are announced: updates cost no trigger.
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_withevents"),
		pgstore.WithEvents(pgstore.Insert, pgstore.Delete))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)

	events := make(chan pgstore.Event, 16)
	sub, err := c.Subscribe(ctx, func(e pgstore.Event) { events <- e })
	if err != nil {
		log.Fatal(err)
	}
	defer sub.Close(ctx)

	for version := int64(1); version <= 2; version++ {
		if err := c.Set(ctx, "cars/bmw", version, car{Model: "bmw", HP: 300}); err != nil {
			log.Fatal(err)
		}
	}
	if err := c.Delete(ctx, "cars/bmw"); err != nil {
		log.Fatal(err)
	}
	printEvent(<-events)
	printEvent(<-events)
	// Output:
	// INSERT cars/bmw version 1
	// DELETE cars/bmw version 2
}

func ExampleEventType_String() {
	for _, t := range []pgstore.EventType{pgstore.CreateTable, pgstore.DestroyTable,
		pgstore.Insert, pgstore.Update, pgstore.Delete, pgstore.Resync} {
		fmt.Println(t)
	}
	fmt.Println(pgstore.EventType(42))
	// Output:
	// CREATE_TABLE
	// DESTROY_TABLE
	// INSERT
	// UPDATE
	// DELETE
	// RESYNC
	// EventType(42)
}

func ExampleConnector_GetSchemaOverview() {
	defer exampleSchema("pgstore_example_overview")()
	ctx := context.Background()
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_overview"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)

	for _, key := range []string{"cars/bmw", "cars/vw", "bikes/bmx"} {
		if err := c.Set(ctx, key, 1, "x"); err != nil {
			log.Fatal(err)
		}
	}
	overview, err := c.GetSchemaOverview(ctx)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(overview)
	// Output:
	// map[bikes:1 cars:2]
}

func ExampleConnector_GetSchemaOverviewOf() {
	defer exampleSchema("pgstore_example_overviewof")()
	ctx := context.Background()
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_overviewof"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)
	for _, key := range []string{"cars/bmw", "cars/vw", "cars/audi"} {
		if err := c.Set(ctx, key, 1, "x"); err != nil {
			log.Fatal(err)
		}
	}

	overview := func(schema string, estimate bool) map[string]int64 {
		m, err := c.GetSchemaOverviewOf(ctx, schema, estimate)
		if err != nil {
			log.Fatal(err)
		}
		return m
	}
	fmt.Println("exact:", overview("pgstore_example_overviewof", false))
	// Estimates cost nothing, but are as of the last VACUUM or ANALYZE: -1
	// for a table never analysed (on PostgreSQL 14 and later).
	fmt.Println("estimate:", overview("pgstore_example_overviewof", true))
	if _, err := c.Exec(ctx, "ANALYZE pgstore_example_overviewof.cars"); err != nil {
		log.Fatal(err)
	}
	fmt.Println("estimate after ANALYZE:", overview("pgstore_example_overviewof", true))
	// A schema that does not exist holds no tables.
	fmt.Println("no such schema:", overview("pgstore_example_nosuchschema", false))
	// Output:
	// exact: map[cars:3]
	// estimate: map[cars:-1]
	// estimate after ANALYZE: map[cars:3]
	// no such schema: map[]
}

func ExampleConnector_CreateSchema() {
	defer exampleSchema("pgstore_example_createschema")()
	defer exampleSchema("pgstore_example_createschema_tenant")()
	ctx := context.Background()
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_createschema"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)

	// Prepare a schema for the connectors of a new tenant (which then need
	// no right to create schemas). Creating it again is fine.
	fmt.Println(c.CreateSchema(ctx, "pgstore_example_createschema_tenant"))
	fmt.Println(c.CreateSchema(ctx, "pgstore_example_createschema_tenant"))

	rows, err := c.Query(ctx, "SELECT count(*) FROM pg_namespace WHERE nspname = $1", "pgstore_example_createschema_tenant")
	if err != nil {
		log.Fatal(err)
	}
	n, err := pgx.CollectExactlyOneRow(rows, pgx.RowTo[int])
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("schemas:", n)
	// Output:
	// <nil>
	// <nil>
	// schemas: 1
}

func ExampleConnector_DestroySchema() {
	defer exampleSchema("pgstore_example_destroyschema")()
	defer exampleSchema("pgstore_example_destroyschema_old")()
	ctx := context.Background()
	url := exampleDatabaseURL()
	c, err := pgstore.Connect(ctx, url, pgstore.WithSchema("pgstore_example_destroyschema"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)
	old, err := pgstore.Connect(ctx, url, pgstore.WithSchema("pgstore_example_destroyschema_old"))
	if err != nil {
		log.Fatal(err)
	}
	if err := old.Set(ctx, "cars/bmw", 1, car{Model: "bmw"}); err != nil {
		log.Fatal(err)
	}
	if err := old.Close(ctx); err != nil {
		log.Fatal(err)
	}

	// Drop the old schema with all its tables.
	fmt.Println(c.DestroySchema(ctx, "pgstore_example_destroyschema_old"))
	err = c.DestroySchema(ctx, "pgstore_example_destroyschema_old")
	fmt.Println(errors.Is(err, pgstore.ErrSchemaNotFound))
	// PostgreSQL's own schemas are refused.
	fmt.Println(c.DestroySchema(ctx, "public"))
	// Output:
	// <nil>
	// true
	// pgstore: DestroySchema: refusing to drop the system schema "public"
}

func ExampleConnector_DropTable() {
	defer exampleSchema("pgstore_example_droptable")()
	ctx := context.Background()
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_droptable"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)
	if err := c.Set(ctx, "cars/bmw", 1, car{Model: "bmw"}); err != nil {
		log.Fatal(err)
	}
	if err := c.Set(ctx, "bikes/bmx", 1, "bmx"); err != nil {
		log.Fatal(err)
	}

	// Subscribers receive DESTROY_TABLE bikes.
	fmt.Println(c.DropTable(ctx, "bikes"))
	overview, err := c.GetSchemaOverview(ctx)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(overview)
	err = c.DropTable(ctx, "bikes")
	fmt.Println(errors.Is(err, pgstore.ErrTableNotFound))
	// Output:
	// <nil>
	// map[cars:1]
	// true
}

func ExampleConnector_Query() {
	defer exampleSchema("pgstore_example_query")()
	ctx := context.Background()
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_query"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)
	for _, cr := range []car{{"bmw", 300}, {"vw", 90}, {"audi", 200}} {
		if err := c.Set(ctx, "cars/"+cr.Model, 1, cr); err != nil {
			log.Fatal(err)
		}
	}

	// Each table has the columns id, version and val (jsonb).
	rows, err := c.Query(ctx, `SELECT id FROM pgstore_example_query.cars
		WHERE (val->>'hp')::int > $1 ORDER BY id`, 150)
	if err != nil {
		log.Fatal(err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(ids)
	// Output:
	// [audi bmw]
}

func ExampleConnector_Exec() {
	defer exampleSchema("pgstore_example_exec")()
	ctx := context.Background()
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_exec"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)
	if err := c.Set(ctx, "cars/bmw", 1, car{Model: "bmw", HP: 300}); err != nil {
		log.Fatal(err)
	}

	// An index for queries on a field of the records.
	tag, err := c.Exec(ctx, "CREATE INDEX cars_model ON pgstore_example_exec.cars ((val->>'model'))")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(tag)
	// Output:
	// CREATE INDEX
}

func ExampleConnector_Schema() {
	defer exampleSchema("pgstore_example_schema")()
	ctx := context.Background()
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_schema"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)
	fmt.Println(c.Schema())
	// Output:
	// pgstore_example_schema
}

func ExampleConnector_Close() {
	defer exampleSchema("pgstore_example_close")()
	ctx := context.Background()
	url := exampleDatabaseURL()
	c, err := pgstore.Connect(ctx, url,
		pgstore.WithSchema("pgstore_example_close"), pgstore.WithWriteInterval(time.Minute))
	if err != nil {
		log.Fatal(err)
	}
	c.SetAsync(ctx, "cars/bmw", 1, car{Model: "bmw", HP: 300}) // buffered for up to a minute

	// On shutdown, Close flushes the buffered writes, within a bound.
	shutdownCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	fmt.Println(c.Close(shutdownCtx))
	fmt.Println(errors.Is(c.Set(ctx, "cars/vw", 1, car{Model: "vw"}), pgstore.ErrClosed))

	c, err = pgstore.Connect(ctx, url, pgstore.WithSchema("pgstore_example_close"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)
	rec, err := c.Get(ctx, "cars/bmw")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(string(rec.Value))
	// Output:
	// <nil>
	// true
	// {"hp": 300, "model": "bmw"}
}

func ExampleConnector_DeleteAsync() {
	defer exampleSchema("pgstore_example_deleteasync")()
	ctx := context.Background()
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_deleteasync"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)
	for _, model := range []string{"bmw", "vw"} {
		if err := c.Set(ctx, "cars/"+model, 1, car{Model: model}); err != nil {
			log.Fatal(err)
		}
	}

	// The removals are accepted at once and applied in call order.
	results := []*pgstore.Result{c.DeleteAsync(ctx, "cars/bmw"), c.DeleteAsync(ctx, "cars/vw")}
	for _, res := range results {
		if err := res.Wait(ctx); err != nil {
			log.Fatal(err)
		}
	}
	_, err = c.Get(ctx, "cars/bmw")
	fmt.Println(errors.Is(err, pgstore.ErrNotFound))
	// Output:
	// true
}

func ExampleWithSchema() {
	defer exampleSchema("pgstore_example_withschema_a")()
	defer exampleSchema("pgstore_example_withschema_b")()
	ctx := context.Background()
	url := exampleDatabaseURL()
	// Connectors on different schemas keep separate records.
	a, err := pgstore.Connect(ctx, url, pgstore.WithSchema("pgstore_example_withschema_a"))
	if err != nil {
		log.Fatal(err)
	}
	defer a.Close(ctx)
	b, err := pgstore.Connect(ctx, url, pgstore.WithSchema("pgstore_example_withschema_b"))
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close(ctx)

	if err := a.Set(ctx, "cars/bmw", 1, "in a"); err != nil {
		log.Fatal(err)
	}
	if err := b.Set(ctx, "cars/bmw", 1, "in b"); err != nil {
		log.Fatal(err)
	}
	for _, c := range []*pgstore.Connector{a, b} {
		rec, err := c.Get(ctx, "cars/bmw")
		if err != nil {
			log.Fatal(err)
		}
		fmt.Println(c.Schema(), string(rec.Value))
	}
	// Output:
	// pgstore_example_withschema_a "in a"
	// pgstore_example_withschema_b "in b"
}

func ExampleWithMaxBatchSize() {
	defer exampleSchema("pgstore_example_maxbatch")()
	ctx := context.Background()
	// No transaction writes more than 100 records.
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(),
		pgstore.WithSchema("pgstore_example_maxbatch"), pgstore.WithMaxBatchSize(100))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)

	var results []*pgstore.Result
	for i := range 1000 {
		results = append(results, c.SetAsync(ctx, fmt.Sprintf("cars/%d", i), 1, i))
	}
	for _, res := range results {
		if err := res.Wait(ctx); err != nil {
			log.Fatal(err)
		}
	}
	overview, err := c.GetSchemaOverview(ctx)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(overview)
	// Output:
	// map[cars:1000]
}

func ExampleWithBufferLimit() {
	defer exampleSchema("pgstore_example_bufferlimit")()
	ctx := context.Background()
	// At most 1 MiB of writes wait in memory; beyond that, SetAsync waits
	// for a flush to make room. Nothing is dropped.
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(),
		pgstore.WithSchema("pgstore_example_bufferlimit"), pgstore.WithBufferLimit(1<<20))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)

	entry := strings.Repeat("x", 10_000)
	var results []*pgstore.Result
	for i := range 500 { // 5 MB in all
		results = append(results, c.SetAsync(ctx, fmt.Sprintf("logs/%d", i), 1, entry))
	}
	for _, res := range results {
		if err := res.Wait(ctx); err != nil {
			log.Fatal(err)
		}
	}
	overview, err := c.GetSchemaOverview(ctx)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(overview)
	// Output:
	// map[logs:500]
}

func ExampleWithDefaultTable() {
	defer exampleSchema("pgstore_example_defaulttable")()
	ctx := context.Background()
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(),
		pgstore.WithSchema("pgstore_example_defaulttable"), pgstore.WithDefaultTable("users"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)

	// A key without "/" is a record of the default table.
	if err := c.Set(ctx, "alice", 1, map[string]string{"name": "Alice"}); err != nil {
		log.Fatal(err)
	}
	rec, err := c.Get(ctx, "users/alice")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(string(rec.Value))
	// Output:
	// {"name": "Alice"}
}

// exampleBusyTable creates, by hand, a record table whose inserts fail as
// they would on a server too busy to serialize them: a passing failure.
func exampleBusyTable(ctx context.Context, c *pgstore.Connector, schema, table string) {
	t := pgx.Identifier{schema, table}.Sanitize()
	fn := pgx.Identifier{schema, "busy"}.Sanitize()
	for _, stmt := range []string{
		"CREATE TABLE " + t + " (id text PRIMARY KEY, version bigint NOT NULL, val jsonb NOT NULL)",
		"CREATE FUNCTION " + fn + "() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RAISE EXCEPTION 'server busy' USING ERRCODE = 'serialization_failure'; END$$",
		"CREATE TRIGGER busy BEFORE INSERT ON " + t + " FOR EACH ROW EXECUTE FUNCTION " + fn + "()",
	} {
		if _, err := c.Exec(ctx, stmt); err != nil {
			log.Fatal(err)
		}
	}
}

func ExampleWithLogger() {
	defer exampleSchema("pgstore_example_logger")()
	ctx := context.Background()
	logger := slog.New(slog.NewTextHandler(os.Stdout, &slog.HandlerOptions{
		ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
			if a.Key == slog.TimeKey && len(groups) == 0 {
				return slog.Attr{} // no time, for a stable output
			}
			return a
		},
	}))
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_logger"),
		pgstore.WithLogger(logger), pgstore.WithRetryTimeout(0))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)
	exampleBusyTable(ctx, c, "pgstore_example_logger", "cars")

	// The failed write is logged, as well as reported to its writer.
	err = c.Set(ctx, "cars/bmw", 1, car{Model: "bmw"})
	fmt.Println("failed:", err != nil)
	// Output:
	// level=ERROR msg="pgstore: batch failed" records=1 attempts=1 err="pgstore: write failed after 1 attempt(s): ERROR: server busy (SQLSTATE 40001)"
	// failed: true
}

func ExampleWithRetryTimeout() {
	defer exampleSchema("pgstore_example_retry")()
	ctx := context.Background()
	// A write that fails for a passing reason is retried for up to a second,
	// then fails with the cause.
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_retry"),
		pgstore.WithRetryTimeout(time.Second), pgstore.WithLogger(nil)) // no log of the retries here
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)
	exampleBusyTable(ctx, c, "pgstore_example_retry", "cars")

	err = c.Set(ctx, "cars/bmw", 1, car{Model: "bmw"})
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		fmt.Println(pgErr.Code, pgErr.Message)
	}
	_, err = c.Get(ctx, "cars/bmw")
	fmt.Println(errors.Is(err, pgstore.ErrNotFound))
	// Output:
	// 40001 server busy
	// true
}

func ExampleWithMaxValueBytes() {
	defer exampleSchema("pgstore_example_maxvalue")()
	ctx := context.Background()
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_maxvalue"),
		pgstore.WithMaxValueBytes(64)) // the largest value a client may store
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)

	err = c.Set(ctx, "notes/n1", 1, strings.Repeat("x", 100))
	fmt.Println(errors.Is(err, pgstore.ErrInvalidValue))
	fmt.Println(c.Set(ctx, "notes/n1", 1, "short"))
	// Output:
	// true
	// <nil>
}

func ExampleWithChangeLog() {
	defer exampleSchema("pgstore_example_log")()
	ctx := context.Background()
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_log"),
		pgstore.WithChangeLog(24*time.Hour))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)

	events := make(chan pgstore.Event, 16)
	sub, err := c.Subscribe(ctx, func(e pgstore.Event) { events <- e })
	if err != nil {
		log.Fatal(err)
	}
	if err := c.Set(ctx, "cars/bmw", 1, car{Model: "bmw", HP: 300}); err != nil {
		log.Fatal(err)
	}
	if err := c.Set(ctx, "cars/bmw", 2, car{Model: "bmw", HP: 310}); err != nil {
		log.Fatal(err)
	}
	<-events // CREATE_TABLE
	first := <-events
	fmt.Println(first.Type, first.Key, first.Offset, string(first.Value))
	<-events
	sub.Close(ctx)

	// Later, perhaps in another process: resume after a saved cursor.
	resumed, err := c.Subscribe(ctx, func(e pgstore.Event) { events <- e }, pgstore.After(first.Cursor))
	if err != nil {
		log.Fatal(err)
	}
	defer resumed.Close(ctx)
	again := <-events
	fmt.Println(again.Type, again.Key, again.Offset, string(again.Value))
	// Output:
	// INSERT cars/bmw 2 {"hp": 300, "model": "bmw"}
	// UPDATE cars/bmw 3 {"hp": 310, "model": "bmw"}
}

// A schema that keeps the NOTIFY feed: its events say what changed, without
// the value, and a lost LISTEN connection costs a Resync. Connectors started
// later without options follow the choice.
func ExampleWithoutChangeLog() {
	defer exampleSchema("pgstore_example_nolog")()
	ctx := context.Background()
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_nolog"),
		pgstore.WithoutChangeLog())
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)

	events := make(chan pgstore.Event, 16)
	sub, err := c.Subscribe(ctx, func(e pgstore.Event) { events <- e }, pgstore.ForEvents(pgstore.Insert))
	if err != nil {
		log.Fatal(err)
	}
	defer sub.Close(ctx)
	if err := c.Set(ctx, "cars/bmw", 1, car{Model: "bmw", HP: 300}); err != nil {
		log.Fatal(err)
	}
	e := <-events
	fmt.Printf("%s %s value %q cursor %q\n", e.Type, e.Key, e.Value, e.Cursor)
	// Output:
	// INSERT cars/bmw value "" cursor ""
}

func ExampleAfter() {
	defer exampleSchema("pgstore_example_after")()
	ctx := context.Background()
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_after"),
		pgstore.WithChangeLog(24*time.Hour))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)
	if err := c.Set(ctx, "cars/bmw", 1, car{Model: "bmw", HP: 300}); err != nil {
		log.Fatal(err)
	}

	// A cold start: read the state, then follow the changes made after it.
	records, cursor, err := c.List(ctx, "cars", "", 100)
	if err != nil {
		log.Fatal(err)
	}
	for _, r := range records {
		fmt.Println("state", r.Key, r.Version)
	}
	events := make(chan pgstore.Event, 16)
	sub, err := c.Subscribe(ctx, func(e pgstore.Event) { events <- e }, pgstore.After(cursor))
	if err != nil {
		log.Fatal(err)
	}
	defer sub.Close(ctx)
	if err := c.Set(ctx, "cars/audi", 1, car{Model: "audi", HP: 250}); err != nil {
		log.Fatal(err)
	}
	e := <-events
	fmt.Println("change", e.Key, e.Version)

	_, err = c.Subscribe(ctx, func(pgstore.Event) {}, pgstore.After("not a cursor"))
	fmt.Println(errors.Is(err, pgstore.ErrInvalidCursor))
	// Output:
	// state cars/bmw 1
	// change cars/audi 1
	// true
}

func ExampleConnector_List() {
	defer exampleSchema("pgstore_example_list")()
	ctx := context.Background()
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_list"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)
	for i := range 5 {
		if err := c.Set(ctx, fmt.Sprintf("cars/c%d", i), 1, i); err != nil {
			log.Fatal(err)
		}
	}
	// Page by page: the last id of a page starts the next.
	for after := ""; ; {
		page, _, err := c.List(ctx, "cars", after, 2)
		if err != nil {
			log.Fatal(err)
		}
		if len(page) == 0 {
			break
		}
		var keys []string
		for _, r := range page {
			keys = append(keys, r.Key)
		}
		fmt.Println(keys)
		after = page[len(page)-1].ID
	}
	// Output:
	// [cars/c0 cars/c1]
	// [cars/c2 cars/c3]
	// [cars/c4]
}

func ExampleConnector_GetMany() {
	defer exampleSchema("pgstore_example_getmany")()
	ctx := context.Background()
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_getmany"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)
	if err := c.Set(ctx, "cars/bmw", 3, car{Model: "bmw", HP: 300}); err != nil {
		log.Fatal(err)
	}
	if err := c.Set(ctx, "bikes/bmx", 1, "bmx"); err != nil {
		log.Fatal(err)
	}
	records, _, err := c.GetMany(ctx, []string{"cars/bmw", "bikes/bmx", "cars/missing", "boats/none"})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(len(records), records["cars/bmw"].Version, string(records["bikes/bmx"].Value))
	// Output:
	// 2 3 "bmx"
}

func ExampleConnector_Stats() {
	defer exampleSchema("pgstore_example_stats")()
	ctx := context.Background()
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_stats"),
		pgstore.WithChangeLog(24*time.Hour))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)
	sub, err := c.Subscribe(ctx, func(pgstore.Event) {})
	if err != nil {
		log.Fatal(err)
	}
	defer sub.Close(ctx)
	for i := range 3 {
		if err := c.Set(ctx, "cars/bmw", int64(i+1), car{Model: "bmw", HP: 300 + i}); err != nil {
			log.Fatal(err)
		}
	}

	// What a metrics collector reads on every scrape: no query is sent.
	st := c.Stats()
	fmt.Println("durable writes:", st.DurableWrites, "failed:", st.FailedWrites.Refused+st.FailedWrites.TimedOut+st.FailedWrites.Unknown)
	fmt.Println("listening:", st.Listener.Listening, "subscriptions:", st.Subscriptions)
	fmt.Println("following the log:", len(st.Log.Lags)) // each with how far it is behind
	// Output:
	// durable writes: 3 failed: 0
	// listening: true subscriptions: 1
	// following the log: 1
}

// timingTracer times each flush and reports its outcome; a tracer of
// OpenTelemetry would start a span in TraceFlushStart and end it in
// TraceFlushEnd.
type timingTracer struct{ flushes chan string }

type flushStartKey struct{}

func (t timingTracer) TraceFlushStart(ctx context.Context, d pgstore.TraceFlushStartData) context.Context {
	return context.WithValue(ctx, flushStartKey{}, time.Now())
}

func (t timingTracer) TraceFlushEnd(ctx context.Context, d pgstore.TraceFlushEndData) {
	took := time.Since(ctx.Value(flushStartKey{}).(time.Time))      // ctx is the one TraceFlushStart returned
	slog.Debug("pgstore flush", "took", took, "durable", d.Durable) // or a span, a histogram
	t.flushes <- fmt.Sprintf("flush: %d durable, %d failed", d.Durable, d.Failed)
}

func ExampleWithTracer() {
	defer exampleSchema("pgstore_example_tracer")()
	ctx := context.Background()
	tracer := timingTracer{flushes: make(chan string, 8)}
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_tracer"), pgstore.WithTracer(tracer))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)

	// Deliveries are the handler's calls: to trace them, wrap the handler.
	traced := func(handle func(pgstore.Event)) func(pgstore.Event) {
		return func(e pgstore.Event) {
			start := time.Now()
			handle(e)
			_ = time.Since(start) // record it: a span, a histogram
		}
	}
	events := make(chan pgstore.Event, 8)
	sub, err := c.Subscribe(ctx, traced(func(e pgstore.Event) { events <- e }), pgstore.ForEvents(pgstore.Insert))
	if err != nil {
		log.Fatal(err)
	}
	defer sub.Close(ctx)

	if err := c.Set(ctx, "cars/bmw", 1, car{Model: "bmw", HP: 300}); err != nil {
		log.Fatal(err)
	}
	fmt.Println(<-tracer.flushes)
	fmt.Println((<-events).Key)
	// Output:
	// flush: 1 durable, 0 failed
	// cars/bmw
}
