package transport

import (
	"encoding/binary"
	"fmt"
	"math/bits"
	"net/netip"
	"time"
	"unsafe"
)

// This file is the TLV layer of the codec. A message body, a snapshot record
// and a nested value are each a sequence of fields:
//
//	field := tag:uvarint  length:uvarint  value:length bytes
//
// A zero value is not sent. A decoder skips a tag it does not know, so a
// newer sender can add fields; see docs/protocol.md.
//
// Each encoded type has one fieldTable: a list of (tag, name, encode,
// decode) built from typed helpers, from which both directions are driven.
// Adding a field to a type is adding one line to its table.

// field is one field of the struct type S.
type field[S any] struct {
	tag  uint64
	name string
	// enc appends the whole field (tag, length, value) for s, or nothing
	// when the value is zero.
	enc func(b []byte, s *S) []byte
	// dec parses the value v into s. It may keep v (queues alias the
	// record buffer).
	dec func(s *S, v []byte) error
}

// fieldTable is the codec of one struct type.
type fieldTable[S any] struct {
	name   string
	fields []field[S]
	byTag  []int // tag → index in fields + 1; 0 for an unknown tag
}

// newTable builds a table. Tags must be unique and non-zero; a mistake here
// is a programming error and panics at package initialisation.
func newTable[S any](name string, fields ...field[S]) *fieldTable[S] {
	t := &fieldTable[S]{name: name, fields: fields}
	for i, f := range fields {
		if f.tag == 0 || f.tag > 1024 {
			panic("transport: table " + name + ": bad tag for " + f.name)
		}
		for uint64(len(t.byTag)) <= f.tag {
			t.byTag = append(t.byTag, 0)
		}
		if t.byTag[f.tag] != 0 {
			panic("transport: table " + name + ": duplicate tag for " + f.name)
		}
		t.byTag[f.tag] = i + 1
	}
	return t
}

// appendFields appends every non-zero field of s.
func (t *fieldTable[S]) appendFields(b []byte, s *S) []byte {
	for i := range t.fields {
		b = t.fields[i].enc(b, s)
	}
	return b
}

// decode parses the fields in b into s, skipping unknown tags. A field that
// occurs twice is decoded twice: the last value of a scalar wins, repeated
// fields accumulate.
func (t *fieldTable[S]) decode(s *S, b []byte) error {
	for len(b) > 0 {
		tag, n := binary.Uvarint(b)
		if n <= 0 {
			return malformedf("%s: bad field tag", t.name)
		}
		b = b[n:]
		l, n := binary.Uvarint(b)
		if n <= 0 {
			return malformedf("%s: bad length of field %d", t.name, tag)
		}
		b = b[n:]
		if l > uint64(len(b)) {
			return malformedf("%s: field %d claims %d bytes, %d remain", t.name, tag, l, len(b))
		}
		v := b[:l:l]
		b = b[l:]
		if tag == 0 {
			return malformedf("%s: field tag 0", t.name)
		}
		if tag >= uint64(len(t.byTag)) || t.byTag[tag] == 0 {
			continue // a newer sender's field: skip it
		}
		f := &t.fields[t.byTag[tag]-1]
		if err := f.dec(s, v); err != nil {
			return malformedf("%s: field %s (tag %d): %v", t.name, f.name, tag, err)
		}
	}
	return nil
}

// appendHeader appends a field's tag and length.
func appendHeader(b []byte, tag uint64, n int) []byte {
	b = binary.AppendUvarint(b, tag)
	return binary.AppendUvarint(b, uint64(n))
}

func uvarintLen(v uint64) int { return (bits.Len64(v|1) + 6) / 7 }

// appendUintField appends tag, length and v as a uvarint, unless v is zero.
func appendUintField(b []byte, tag uint64, v uint64) []byte {
	if v == 0 {
		return b
	}
	b = appendHeader(b, tag, uvarintLen(v))
	return binary.AppendUvarint(b, v)
}

// parseUint parses a value holding one uvarint that fits in nbits bits.
func parseUint(v []byte, nbits int) (uint64, error) {
	x, n := binary.Uvarint(v)
	if n <= 0 || n != len(v) {
		return 0, fmt.Errorf("not a single varint")
	}
	if nbits < 64 && x>>nbits != 0 {
		return 0, fmt.Errorf("value %d overflows %d bits", x, nbits)
	}
	return x, nil
}

// unsigned is the set of unsigned integer types a field can hold.
type unsigned interface {
	~uint8 | ~uint16 | ~uint32 | ~uint64
}

// signed is the set of signed integer types a field can hold.
type signed interface {
	~int8 | ~int16 | ~int32 | ~int64
}

// uintField is an unsigned integer, sent as a uvarint.
func uintField[S any, T unsigned](tag uint64, name string, get func(*S) *T) field[S] {
	nbits := int(unsafe.Sizeof(T(0))) * 8
	return field[S]{tag: tag, name: name,
		enc: func(b []byte, s *S) []byte { return appendUintField(b, tag, uint64(*get(s))) },
		dec: func(s *S, v []byte) error {
			x, err := parseUint(v, nbits)
			*get(s) = T(x)
			return err
		},
	}
}

// intField is a signed integer, sent zigzag-encoded as a uvarint.
func intField[S any, T signed](tag uint64, name string, get func(*S) *T) field[S] {
	nbits := int(unsafe.Sizeof(T(0))) * 8
	return field[S]{tag: tag, name: name,
		enc: func(b []byte, s *S) []byte {
			x := int64(*get(s))
			return appendUintField(b, tag, uint64(x<<1)^uint64(x>>63))
		},
		dec: func(s *S, v []byte) error {
			u, err := parseUint(v, 64)
			if err != nil {
				return err
			}
			x := int64(u>>1) ^ -int64(u&1)
			if nbits < 64 && (x < -1<<(nbits-1) || x > 1<<(nbits-1)-1) {
				return fmt.Errorf("value %d overflows %d bits", x, nbits)
			}
			*get(s) = T(x)
			return nil
		},
	}
}

// durationField is a time.Duration in nanoseconds, sent as a signed integer.
func durationField[S any](tag uint64, name string, get func(*S) *time.Duration) field[S] {
	return intField(tag, name, func(s *S) *int64 { return (*int64)(get(s)) })
}

// boolField is a boolean, sent as the uvarint 1 when true.
func boolField[S any](tag uint64, name string, get func(*S) *bool) field[S] {
	return field[S]{tag: tag, name: name,
		enc: func(b []byte, s *S) []byte {
			if !*get(s) {
				return b
			}
			return append(appendHeader(b, tag, 1), 1)
		},
		dec: func(s *S, v []byte) error {
			x, err := parseUint(v, 1)
			*get(s) = x == 1
			return err
		},
	}
}

// bytesField is a byte string, sent as it is. The decoded slice aliases the
// input buffer; an empty value decodes as nil.
func bytesField[S any](tag uint64, name string, get func(*S) *[]byte) field[S] {
	return field[S]{tag: tag, name: name,
		enc: func(b []byte, s *S) []byte {
			p := *get(s)
			if len(p) == 0 {
				return b
			}
			return append(appendHeader(b, tag, len(p)), p...)
		},
		dec: func(s *S, v []byte) error {
			if len(v) == 0 {
				v = nil
			}
			*get(s) = v
			return nil
		},
	}
}

// stringField is a string, sent as its bytes.
func stringField[S any](tag uint64, name string, get func(*S) *string) field[S] {
	return field[S]{tag: tag, name: name,
		enc: func(b []byte, s *S) []byte {
			p := *get(s)
			if len(p) == 0 {
				return b
			}
			return append(appendHeader(b, tag, len(p)), p...)
		},
		dec: func(s *S, v []byte) error {
			*get(s) = string(v)
			return nil
		},
	}
}

// stringsField is a list of strings, sent as one field per element.
func stringsField[S any](tag uint64, name string, get func(*S) *[]string) field[S] {
	return field[S]{tag: tag, name: name,
		enc: func(b []byte, s *S) []byte {
			for _, p := range *get(s) {
				b = append(appendHeader(b, tag, len(p)), p...)
			}
			return b
		},
		dec: func(s *S, v []byte) error {
			p := get(s)
			*p = append(*p, string(v))
			return nil
		},
	}
}

// uint32sField is a list of 32-bit unsigned integers, sent packed: one field
// whose value is the uvarints one after the other.
func uint32sField[S any](tag uint64, name string, get func(*S) *[]uint32) field[S] {
	return field[S]{tag: tag, name: name,
		enc: func(b []byte, s *S) []byte {
			xs := *get(s)
			if len(xs) == 0 {
				return b
			}
			n := 0
			for _, x := range xs {
				n += uvarintLen(uint64(x))
			}
			b = appendHeader(b, tag, n)
			for _, x := range xs {
				b = binary.AppendUvarint(b, uint64(x))
			}
			return b
		},
		dec: func(s *S, v []byte) error {
			p := get(s)
			for len(v) > 0 {
				x, n := binary.Uvarint(v)
				if n <= 0 || x > 1<<32-1 {
					return fmt.Errorf("bad packed 32-bit varint")
				}
				*p = append(*p, uint32(x))
				v = v[n:]
			}
			return nil
		},
	}
}

// fixedField is a byte array of a fixed size, sent only when not all zero.
// A longer value is accepted and its tail ignored (a newer sender may have
// grown the structure); a shorter one is malformed.
func fixedField[S any](tag uint64, name string, size int, get func(*S) []byte) field[S] {
	return field[S]{tag: tag, name: name,
		enc: func(b []byte, s *S) []byte {
			p := get(s)
			for _, c := range p {
				if c != 0 {
					return append(appendHeader(b, tag, size), p...)
				}
			}
			return b
		},
		dec: func(s *S, v []byte) error {
			if len(v) < size {
				return fmt.Errorf("%d bytes, want %d", len(v), size)
			}
			copy(get(s), v[:size])
			return nil
		},
	}
}

// addrPortField is an address and port: the address (4 bytes for IPv4, 16
// for IPv6 including IPv4-mapped, none for an invalid address), the port as
// two bytes big-endian, then the IPv6 zone if any.
func addrPortField[S any](tag uint64, name string, get func(*S) *netip.AddrPort) field[S] {
	return field[S]{tag: tag, name: name,
		enc: func(b []byte, s *S) []byte {
			ap := *get(s)
			if ap == (netip.AddrPort{}) {
				return b
			}
			return appendAddrPort(b, tag, ap)
		},
		dec: func(s *S, v []byte) error {
			ap, err := parseAddrPort(v)
			*get(s) = ap
			return err
		},
	}
}

func appendAddrPort(b []byte, tag uint64, ap netip.AddrPort) []byte {
	a := ap.Addr()
	var n int
	switch {
	case a.Is4():
		n = 4
	case a.Is6():
		n = 16 + len(a.Zone())
	}
	b = appendHeader(b, tag, n+2)
	switch {
	case a.Is4():
		x := a.As4()
		b = append(b, x[:]...)
	case a.Is6():
		x := a.As16()
		b = append(b, x[:]...)
	}
	b = binary.BigEndian.AppendUint16(b, ap.Port())
	if a.Is6() {
		b = append(b, a.Zone()...)
	}
	return b
}

func parseAddrPort(v []byte) (netip.AddrPort, error) {
	var a netip.Addr
	switch {
	case len(v) == 2:
	case len(v) == 6:
		a = netip.AddrFrom4([4]byte(v[:4]))
	case len(v) >= 18:
		a = netip.AddrFrom16([16]byte(v[:16]))
		if len(v) > 18 {
			a = a.WithZone(string(v[18:]))
		}
	default:
		return netip.AddrPort{}, fmt.Errorf("%d bytes is not an address and port", len(v))
	}
	port := binary.BigEndian.Uint16(v[len(v)-2-zoneLen(v):])
	return netip.AddrPortFrom(a, port), nil
}

// zoneLen is the length of the zone at the end of an encoded address and port.
func zoneLen(v []byte) int {
	if len(v) > 18 {
		return len(v) - 18
	}
	return 0
}

// prefixesField is a list of address prefixes, one field per element: the
// address (4 or 16 bytes) then the prefix length as one byte.
func prefixesField[S any](tag uint64, name string, get func(*S) *[]netip.Prefix) field[S] {
	return field[S]{tag: tag, name: name,
		enc: func(b []byte, s *S) []byte {
			for _, p := range *get(s) {
				a := p.Addr()
				if a.Is4() {
					x := a.As4()
					b = append(append(appendHeader(b, tag, 5), x[:]...), byte(p.Bits()))
				} else {
					x := a.As16()
					b = append(append(appendHeader(b, tag, 17), x[:]...), byte(p.Bits()))
				}
			}
			return b
		},
		dec: func(s *S, v []byte) error {
			var a netip.Addr
			switch len(v) {
			case 5:
				a = netip.AddrFrom4([4]byte(v[:4]))
			case 17:
				a = netip.AddrFrom16([16]byte(v[:16]))
			default:
				return fmt.Errorf("%d bytes is not a prefix", len(v))
			}
			p := netip.PrefixFrom(a, int(v[len(v)-1]))
			if !p.IsValid() {
				return fmt.Errorf("prefix length %d out of range", v[len(v)-1])
			}
			l := get(s)
			*l = append(*l, p)
			return nil
		},
	}
}

// nestedField is a struct sent as a nested sequence of fields, omitted when
// it encodes to nothing.
func nestedField[S, T any](tag uint64, name string, t *fieldTable[T], get func(*S) *T) field[S] {
	return field[S]{tag: tag, name: name,
		enc: func(b []byte, s *S) []byte { return appendNested(b, tag, t, get(s), false) },
		dec: func(s *S, v []byte) error { return t.decode(get(s), v) },
	}
}

// nestedListField is a list of structs, one nested field per element. An
// element is sent even when it encodes to nothing, so the count survives.
func nestedListField[S, T any](tag uint64, name string, t *fieldTable[T], get func(*S) *[]T) field[S] {
	return boundedListField(tag, name, t, 0, get)
}

// boundedListField is nestedListField with at most max elements (0: no
// bound but the frame's size): the element past max fails the decode at
// once, before a frame of tiny elements can make a list far larger in
// memory than on the wire.
func boundedListField[S, T any](tag uint64, name string, t *fieldTable[T], max int, get func(*S) *[]T) field[S] {
	return field[S]{tag: tag, name: name,
		enc: func(b []byte, s *S) []byte {
			l := *get(s)
			for i := range l {
				b = appendNested(b, tag, t, &l[i], true)
			}
			return b
		},
		dec: func(s *S, v []byte) error {
			l := get(s)
			if max > 0 && len(*l) >= max {
				return malformedf("%s: more than %d", name, max)
			}
			var x T
			if err := t.decode(&x, v); err != nil {
				return err
			}
			*l = append(*l, x)
			return nil
		},
	}
}

// appendNested appends a field whose value is the fields of x. The length
// comes before the value, so the value is encoded first with a one-byte
// length and moved if its length needs more.
func appendNested[T any](b []byte, tag uint64, t *fieldTable[T], x *T, always bool) []byte {
	start := len(b)
	b = binary.AppendUvarint(b, tag)
	lenAt := len(b)
	b = append(b, 0)
	b = t.appendFields(b, x)
	n := len(b) - lenAt - 1
	if n == 0 && !always {
		return b[:start]
	}
	if n < 0x80 {
		b[lenAt] = byte(n)
		return b
	}
	extra := uvarintLen(uint64(n)) - 1
	b = append(b, make([]byte, extra)...)
	copy(b[lenAt+1+extra:], b[lenAt+1:lenAt+1+n])
	binary.PutUvarint(b[lenAt:], uint64(n))
	return b
}
