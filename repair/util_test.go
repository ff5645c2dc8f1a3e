package repair

import (
	"fmt"
	"reflect"
)

// diffFields lists the fields of two structs of the same type that differ,
// with byte slices shown by length only.
func diffFields(a, b any) []string {
	va, vb := reflect.ValueOf(a), reflect.ValueOf(b)
	var out []string
	for i := 0; i < va.NumField(); i++ {
		fa, fb := va.Field(i), vb.Field(i)
		if reflect.DeepEqual(fa.Interface(), fb.Interface()) {
			continue
		}
		name := va.Type().Field(i).Name
		if fa.Kind() == reflect.Struct {
			for _, d := range diffFields(fa.Interface(), fb.Interface()) {
				out = append(out, name+"."+d)
			}
			continue
		}
		if fa.Kind() == reflect.Slice {
			out = append(out, fmt.Sprintf("%s: %d bytes vs %d bytes (contents differ)", name, fa.Len(), fb.Len()))
			continue
		}
		out = append(out, fmt.Sprintf("%s: %v vs %v", name, fa.Interface(), fb.Interface()))
	}
	return out
}
