package mapbroker

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strings"
	"unicode/utf8"

	"github.com/centrifugal/centrifuge"
)

// An envelope is a map entry as a pgstore record value: the publication's
// bytes and what the broker keeps beside them. Bytes that are valid UTF-8
// without NUL go in a JSON string ("data"), which jsonb keeps exactly as
// given, so JSON payloads stay readable in SQL ((val->>'data')::jsonb);
// other bytes (protobuf, anything binary) go in standard base64
// ("data_b64"). Either way the bytes read back are the bytes published.
type envelope struct {
	// Marker tells an envelope from a record that someone wrote to the
	// channel's table with pgstore directly.
	Marker  int       `json:"centrifuge"`
	Epoch   string    `json:"epoch"`
	Data    *string   `json:"data,omitempty"`
	DataB64 *string   `json:"data_b64,omitempty"`
	Tags    tagMap    `json:"tags,omitempty"`
	Info    *infoJSON `json:"info,omitempty"`
	// Time is when the entry was published, in Unix milliseconds.
	Time         int64  `json:"time,omitempty"`
	Version      uint64 `json:"version,omitempty"`
	VersionEpoch string `json:"version_epoch,omitempty"`
	// Delta says the publication asked for delta delivery: the broker's
	// stream index holds the value it replaced (see streamTable).
	Delta bool `json:"delta,omitempty"`
}

const envelopeMarker = 1

type tagMap map[string]string

type infoJSON struct {
	Client      string  `json:"client,omitempty"`
	User        string  `json:"user,omitempty"`
	ConnInfo    *string `json:"conn_info,omitempty"`
	ConnInfoB64 *string `json:"conn_info_b64,omitempty"`
	ChanInfo    *string `json:"chan_info,omitempty"`
	ChanInfoB64 *string `json:"chan_info_b64,omitempty"`
}

// encodeBytes puts b in one of a text field or a base64 field; nil stays
// out of both.
func encodeBytes(b []byte) (text, b64 *string) {
	if b == nil {
		return nil, nil
	}
	if utf8.Valid(b) && bytes.IndexByte(b, 0) < 0 {
		s := string(b)
		return &s, nil
	}
	s := base64.StdEncoding.EncodeToString(b)
	return nil, &s
}

func decodeBytes(text, b64 *string) ([]byte, error) {
	switch {
	case text != nil:
		return []byte(*text), nil
	case b64 != nil:
		return base64.StdEncoding.DecodeString(*b64)
	}
	return nil, nil
}

// checkText reports why s cannot be stored as PostgreSQL text or in a jsonb
// string exactly as it is.
func checkText(what, s string) error {
	if !utf8.ValidString(s) {
		return fmt.Errorf("%w: %s %q is not valid UTF-8", ErrInvalidValue, what, s)
	}
	if strings.IndexByte(s, 0) >= 0 {
		return fmt.Errorf("%w: %s %q holds a NUL byte, which PostgreSQL text cannot store", ErrInvalidValue, what, s)
	}
	return nil
}

func checkTags(tags map[string]string) error {
	for k, v := range tags {
		if err := checkText("tag name", k); err != nil {
			return err
		}
		if err := checkText("value of tag "+k, v); err != nil {
			return err
		}
	}
	return nil
}

// checkPublication reports why a publication's text cannot be stored
// exactly as given.
func checkPublication(opts centrifuge.MapPublishOptions) error {
	if err := checkTags(opts.Tags); err != nil {
		return err
	}
	if err := checkText("VersionEpoch", opts.VersionEpoch); err != nil {
		return err
	}
	if ci := opts.ClientInfo; ci != nil {
		if err := checkText("ClientInfo.ClientID", ci.ClientID); err != nil {
			return err
		}
		if err := checkText("ClientInfo.UserID", ci.UserID); err != nil {
			return err
		}
	}
	return nil
}

// newEnvelope makes the record value of a publication that passed
// checkPublication; versionEpoch is its own or the stored entry's, which
// passed it before.
func newEnvelope(epoch string, opts centrifuge.MapPublishOptions, version uint64, versionEpoch string, now int64) envelope {
	env := envelope{
		Marker:       envelopeMarker,
		Epoch:        epoch,
		Tags:         opts.Tags,
		Time:         now,
		Version:      version,
		VersionEpoch: versionEpoch,
		Delta:        opts.UseDelta,
	}
	env.Data, env.DataB64 = encodeBytes(opts.Data)
	if ci := opts.ClientInfo; ci != nil {
		env.Info = &infoJSON{Client: ci.ClientID, User: ci.UserID}
		env.Info.ConnInfo, env.Info.ConnInfoB64 = encodeBytes(ci.ConnInfo)
		env.Info.ChanInfo, env.Info.ChanInfoB64 = encodeBytes(ci.ChanInfo)
	}
	return env
}

// An entry is a record of a channel's table as the broker reads it.
type entry struct {
	env     envelope
	foreign bool   // not an envelope: written to the table without the broker
	raw     []byte // the record's JSON, the Data of a foreign record
}

func decodeEntry(val []byte) entry {
	var env envelope
	if err := json.Unmarshal(val, &env); err != nil || env.Marker != envelopeMarker {
		// Any other JSON is a record that a pgstore user wrote: its
		// Data is its JSON.
		return entry{foreign: true, raw: val}
	}
	return entry{env: env}
}

// publication turns an entry into the publication of a key.
func (e entry) publication(key string, offset uint64) (*centrifuge.Publication, error) {
	pub := &centrifuge.Publication{Key: key, Offset: offset}
	if e.foreign {
		pub.Data = e.raw
		return pub, nil
	}
	var err error
	if pub.Data, err = decodeBytes(e.env.Data, e.env.DataB64); err != nil {
		return nil, fmt.Errorf("mapbroker: key %q: data: %w", key, err)
	}
	pub.Tags = e.env.Tags
	pub.Time = e.env.Time
	if in := e.env.Info; in != nil {
		pub.Info = &centrifuge.ClientInfo{ClientID: in.Client, UserID: in.User}
		if pub.Info.ConnInfo, err = decodeBytes(in.ConnInfo, in.ConnInfoB64); err != nil {
			return nil, fmt.Errorf("mapbroker: key %q: conn info: %w", key, err)
		}
		if pub.Info.ChanInfo, err = decodeBytes(in.ChanInfo, in.ChanInfoB64); err != nil {
			return nil, fmt.Errorf("mapbroker: key %q: chan info: %w", key, err)
		}
	}
	return pub, nil
}

func (e entry) tags() map[string]string {
	if e.foreign {
		return nil
	}
	return e.env.Tags
}

func (e entry) version() (uint64, string) {
	if e.foreign {
		return 0, ""
	}
	return e.env.Version, e.env.VersionEpoch
}

// tagsJSON is the jsonb of a removal's tags; nil when there are none. The
// tags are a Remove's, which it checked, or a stored entry's, which jsonb
// held; and a map of strings always marshals.
func tagsJSON(tags map[string]string) []byte {
	if len(tags) == 0 {
		return nil
	}
	b, _ := json.Marshal(tags)
	return b
}
