package grammar

import (
	"reflect"
)

// withoutSpans is a deep copy of v with every Span (and Pos) zeroed, so
// two rules compare by meaning, not by where their text was.
func withoutSpans(v reflect.Value) reflect.Value {
	switch v.Kind() {
	case reflect.Pointer:
		if v.IsNil() {
			return v
		}
		out := reflect.New(v.Elem().Type())
		out.Elem().Set(withoutSpans(v.Elem()))
		return out
	case reflect.Slice:
		if v.IsNil() {
			return v
		}
		out := reflect.MakeSlice(v.Type(), v.Len(), v.Len())
		for i := range v.Len() {
			out.Index(i).Set(withoutSpans(v.Index(i)))
		}
		return out
	case reflect.Struct:
		out := reflect.New(v.Type()).Elem()
		if v.Type() == reflect.TypeOf(Span{}) || v.Type() == reflect.TypeOf(Pos{}) {
			return out
		}
		if v.Type().PkgPath() != reflect.TypeOf(Rule{}).PkgPath() {
			return v // netip values: compared as they are
		}
		for i := range v.NumField() {
			out.Field(i).Set(withoutSpans(v.Field(i)))
		}
		return out
	}
	return v
}

// sameMeaning reports whether two rules are equal but for positions.
func sameMeaning(a, b *Rule) bool {
	return reflect.DeepEqual(withoutSpans(reflect.ValueOf(a)).Interface(), withoutSpans(reflect.ValueOf(b)).Interface())
}
