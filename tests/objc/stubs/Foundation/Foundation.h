// Declaration-only stand-in for Apple's <Foundation/Foundation.h>, for
// compiling the Apple-only sources on machines without the macOS SDK
// (tests/objc/). Only what jax_mfa uses; never linked, never run. It follows
// the SDK's C++ forms where they matter (BOOL, nil, NS_ENUM / NS_OPTIONS,
// availability); tests/objc/test_apple_data.py checks every declaration the
// Objective-C++ uses against Apple-authored data (metal-cpp, PyObjC metadata).
#pragma once

#include <stddef.h>
#include <stdint.h>

#pragma clang assume_nonnull begin

// <objc/objc.h>: BOOL is bool where the compiler says so (arm64 macOS), else
// signed char (x86_64 macOS).
#if defined(__OBJC_BOOL_IS_BOOL) && __OBJC_BOOL_IS_BOOL
typedef bool BOOL;
#else
typedef signed char BOOL;
#endif
#define YES ((BOOL)1)
#define NO ((BOOL)0)
#ifndef nil
#if defined(__cplusplus) && __has_feature(cxx_nullptr)
#define nil nullptr
#else
#define nil __null
#endif
#endif
typedef unsigned long NSUInteger;
typedef long NSInteger;

// <os/availability.h>
#define API_AVAILABLE_macos(v) __attribute__((availability(macos, introduced = v)))
#define API_AVAILABLE(platform_version) API_AVAILABLE_##platform_version
#define API_DEPRECATED_macos(from, to) \
  __attribute__((availability(macos, introduced = from, deprecated = to)))

// <CoreFoundation/CFAvailability.h>, C++ forms: an enum with a fixed type, and
// for options an integer typedef plus an anonymous enum (so OR-ed options are
// plain integers, as in the SDK).
#define NS_ENUM(TYPE, NAME) enum NAME : TYPE NAME; enum NAME : TYPE
#define NS_OPTIONS(TYPE, NAME) \
  TYPE NAME;                   \
  enum __attribute__((flag_enum, enum_extensibility(open))) : NAME

@class NSString;

@protocol NSObject
- (BOOL)isEqual:(id)object;
@property(readonly) NSUInteger hash;
@end

@protocol NSCopying
- (id)copyWithZone:(void* _Nullable)zone;
@end

__attribute__((objc_root_class))
@interface NSObject <NSObject>
+ (instancetype)alloc;
+ (instancetype)new;
- (instancetype)init;
@end

typedef NSUInteger NSStringEncoding;
enum : NSStringEncoding { NSUTF8StringEncoding = 4 };

@interface NSString : NSObject <NSCopying>
+ (nullable instancetype)stringWithCString:(const char*)cString encoding:(NSStringEncoding)enc;
@property(nullable, readonly) const char* UTF8String;
@property(readonly) NSUInteger length;
@end

@interface NSNumber : NSObject <NSCopying>
+ (NSNumber*)numberWithInt:(int)value;
@end

@interface NSArray<__covariant ObjectType> : NSObject
@property(readonly) NSUInteger count;
- (ObjectType)objectAtIndex:(NSUInteger)index;
@end

@interface NSDictionary<__covariant KeyType, __covariant ObjectType> : NSObject
+ (instancetype)dictionaryWithObjects:(const ObjectType _Nonnull[_Nullable])objects
                              forKeys:(const KeyType<NSCopying> _Nonnull[_Nullable])keys
                                count:(NSUInteger)cnt;
@property(readonly) NSUInteger count;
@end

@interface NSError : NSObject
@property(readonly) NSInteger code;
@property(readonly, copy) NSString* localizedDescription;
@end

#pragma clang assume_nonnull end
